"""The hostile probe's cases: half-finished protocol switches, deleted locks, edited manifests and level files, names
that lead outside the store, links out of the run dir, paths that cannot be written, a killed DDP peer, stop messages.
Each ends in one clear message (exit code 2 on the command line) or correct behaviour, and leaves nothing behind that
looks complete."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, SMOKE, compose

from gisp.cli import Interrupted, user_errors
from gisp.config import load_settings
from gisp.deploy import evaluate_run
from gisp.errors import GispError
from gisp.eval.report import levels, levels_text, protocol_notes
from gisp.eval.suite import eval_task_specs
from gisp.io import FolderLock, read_json, read_jsonl
from gisp.pipeline import run
from gisp.runs import RunDir

pytestmark = pytest.mark.e2e  # end to end: runs as users type, in fresh processes


def _cfg(tmp_path, *overrides):
    return compose("config", *["logger=none", "progress=false", f"cache_dir={tmp_path / 'cache'}",
                                        f"store_dir={tmp_path / 'store'}", *SMOKE, *overrides])


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _one_line_refusal(proc, text: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert text in out and "Traceback" not in out, out[-3000:]


@pytest.fixture
def finished(tmp_path):
    """A finished run to 0.3 and 0.5 with its own store (tests edit it)."""
    results = run(load_settings(_cfg(tmp_path, "sparsity=[0.3,0.5]")), tmp_path / "run")
    return tmp_path, tmp_path / "run", results


# ---------------------------------------------------------------------------------------------------------------
# A protocol switch that dies half-way


def test_a_protocol_switch_stopped_half_way_says_it_is_mixed_until_finished(finished, monkeypatch):
    tmp, run_dir, _ = finished
    fewer = eval_task_specs(_cfg(tmp, "eval.tasks.wikitext2_ppl.max_windows=4")["eval"])
    from gisp.eval.suite import Evaluator

    calls, real = [], Evaluator.__call__

    def stopped_on_the_second_level(self, model, progress=True):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted(signal.SIGTERM)
        return real(self, model, progress)

    monkeypatch.setattr(Evaluator, "__call__", stopped_on_the_second_level)
    with pytest.raises(Interrupted):
        evaluate_run(run_dir, fewer, [0.3, 0.5], dense=True, progress=False)
    results = read_json(run_dir / "results.json")
    assert results["complete"] is False and results["mixed_protocols"] == {"wikitext2_ppl": ["0.3", "0.5"]}
    assert results["evaluation"]["wikitext2_ppl"]["n_windows"] == 4
    shown = {key: metrics for key, _, metrics in levels(results)}
    assert "wikitext2_ppl" in shown["dense"] and "wikitext2_ppl" not in shown["0.3"]  # stale values left out
    assert "wikitext2_ppl_2048" in shown["0.3"]  # the other task kept its protocol
    assert "older evaluation protocol" in levels_text(results)
    assert any("unfinished re-evaluation" in n for n in protocol_notes([("run", results)]))
    monkeypatch.setattr(Evaluator, "__call__", real)
    done = evaluate_run(run_dir, fewer, [0.3, 0.5], dense=True, progress=False)  # the same command finishes it
    assert done["complete"] is True and "mixed_protocols" not in done
    assert {e["evaluated"]["wikitext2_ppl"] for e in [done["dense"], *done["targets"].values()]} == \
        {done["dense"]["evaluated"]["wikitext2_ppl"]}


def test_the_protocol_refusal_names_a_command_that_works(finished):
    tmp, run_dir, _ = finished
    fewer = eval_task_specs(_cfg(tmp, "eval.tasks.wikitext2_ppl.max_windows=4")["eval"])
    with pytest.raises(GispError) as refused:
        evaluate_run(run_dir, fewer, [0.4], dense=False, progress=False)  # a new level with new settings
    command = shlex.split(str(refused.value).splitlines()[-1])
    targets = next(w for w in command if w.startswith("sparsity="))
    assert targets == "sparsity=[0.3,0.4,0.5]" and "dense=true" in command
    followed = evaluate_run(run_dir, fewer, [0.3, 0.4, 0.5], dense=True, progress=False)
    assert followed["complete"] and followed["evaluation"]["wikitext2_ppl"]["n_windows"] == 4


def test_collect_and_the_summary_flag_protocols_that_differ(finished, tmp_path_factory):
    _, run_dir, results = finished
    other = tmp_path_factory.mktemp("other")
    fewer = run(load_settings(_cfg(other, "sparsity=[0.3,0.5]", "eval.tasks.wikitext2_ppl.max_windows=4")),
                other / "run")
    notes = protocol_notes([("a", results), ("b", fewer)])
    assert any("wikitext2_ppl was measured with 2 different protocols" in n for n in notes)
    proc = subprocess.run([sys.executable, "experiments/collect.py", f"{run_dir}=a", f"{other / 'run'}=b"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert "different protocols" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Locks that survive their files being deleted


def _hold(folder):
    script = ("import sys, time\nfrom gisp.io import FolderLock\n"
              f"lock = FolderLock({str(folder)!r})\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_deleting_lock_files_lets_no_second_writer_in(finished):
    tmp, run_dir, _ = finished
    holder = _hold(run_dir)
    try:
        for p in run_dir.glob(".gisp*"):  # what a cleanup script removes
            p.unlink()
        with pytest.raises(GispError, match="in use by another gisp command"):
            run(load_settings(_cfg(tmp, "sparsity=[0.3,0.5,0.6]")), run_dir)
        traj_dir = RunDir(run_dir).trajectory.directory
    finally:
        holder.kill()
        holder.wait()
    store_holder = _hold(traj_dir)
    try:
        for p in list(traj_dir.glob(".gisp*")) + list(traj_dir.parent.glob("*.lock")):
            p.unlink()
        assert not FolderLock(traj_dir, timeout=0.5, poll=0.1).acquire()
    finally:
        store_holder.kill()
        store_holder.wait()
    assert read_json(run_dir / "results.json")["targets"].keys() == {"0.3", "0.5"}


# ---------------------------------------------------------------------------------------------------------------
# Manifests and level files checked against what they describe


def _edit_manifest(run_dir, edit) -> None:
    path = RunDir(run_dir).trajectory.path
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_an_edited_step_record_is_refused(finished):
    tmp, run_dir, _ = finished
    _edit_manifest(run_dir, lambda m: m["steps"][0].update(sparsity=0.2))
    with pytest.raises(GispError, match=r"step 1 records sparsity=0.2 \(its masks: 0\.0\d+\)"):
        _ = RunDir(run_dir).trajectory
    with pytest.raises(GispError, match="step 1 records sparsity=0.2"):  # and in the command that would reuse it
        run(load_settings(_cfg(tmp, "sparsity=[0.2,0.3,0.5]")), run_dir)
    assert "0.2" not in read_json(run_dir / "results.json")["targets"]
    proc = _cli("gisp.evaluate", f"run_dir={run_dir}", "sparsity=[0.2]", "logger=none")
    _one_line_refusal(proc, "step 1 records sparsity=0.2")


def test_a_null_field_and_names_outside_the_store_are_refused(finished):
    _, run_dir, _ = finished
    traj_dir = RunDir(run_dir).trajectory.directory.resolve()
    original = (traj_dir / "manifest.json").read_text()
    _edit_manifest(run_dir, lambda m: m["steps"][1].update(heads_kept=None))
    with pytest.raises(GispError, match="step 2 has heads_kept=None"):
        _ = RunDir(run_dir).trajectory
    (traj_dir / "manifest.json").write_text(original)
    _edit_manifest(run_dir, lambda m: m["steps"][0].update(order="../../../../etc/passwd"))
    with pytest.raises(GispError) as refused:
        _ = RunDir(run_dir).trajectory
    message = str(refused.value)
    assert "not a file of the trajectory's folder" in message and f"delete {traj_dir} " in message
    assert "delete /etc" not in message


def test_a_linked_levels_folder_is_never_written_through(finished, tmp_path_factory):
    tmp, run_dir, _ = finished
    outside = tmp_path_factory.mktemp("outside")
    shutil.rmtree(run_dir / "levels")
    (run_dir / "levels").symlink_to(outside, target_is_directory=True)
    tasks = eval_task_specs(_cfg(tmp)["eval"])
    with pytest.raises(GispError, match="outside the run dir"):
        evaluate_run(run_dir, tasks, [0.4], dense=False, progress=False)
    with pytest.raises(GispError, match="outside the run dir"):
        run(load_settings(_cfg(tmp, "sparsity=[0.3,0.5]")), run_dir)
    assert not list(outside.iterdir())


def test_edited_level_files_and_unnested_steps_are_refused(finished, tmp_path):
    from gisp.deploy import export_from_run
    from gisp.prune.masks import Masks

    tmp, run_dir, _ = finished
    level = run_dir / "levels" / "level_0.3.safetensors"
    masks = Masks.load(level)
    masks.channels[2, :5] = ~masks.channels[2, :5]
    masks.save(level)
    with pytest.raises(GispError, match="level_0.3.safetensors does not hold the masks"):
        export_from_run(run_dir, tmp_path / "out", sparsity=0.3, cache_dir=tmp / "cache")
    with pytest.raises(GispError, match="level_0.3.safetensors does not hold the masks"):
        evaluate_run(run_dir, eval_task_specs(_cfg(tmp)["eval"]), [0.3], dense=False, progress=False)
    level.unlink()  # gisp writes it again from the trajectory
    assert evaluate_run(run_dir, eval_task_specs(_cfg(tmp)["eval"]), [0.3], dense=False, progress=False)["complete"]

    def swap(m):  # steps 1 and 2 swapped with their records and checksums: every file intact, but not nested
        a, b = m["steps"][0], m["steps"][1]
        for k in ("masks", "order", "sha256", "sparsity", "heads_kept", "channels_kept", "structural_ratio"):
            a[k], b[k] = b[k], a[k]

    _edit_manifest(run_dir, swap)
    with pytest.raises(GispError, match="not nested"):
        export_from_run(run_dir, tmp_path / "out", step=2, cache_dir=tmp / "cache")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Paths that cannot be written: one line, before loading, nothing left behind


def test_unwritable_paths_are_one_line_before_loading(finished, tmp_path_factory):
    tmp, run_dir, _ = finished
    tmp_path = tmp_path_factory.mktemp("probe")
    (tmp_path / "file").write_text("x")
    cases = [
        (("gisp.export", f"run_dir={run_dir}", "sparsity=0.3", "out=/proc/x"), "output folder /proc cannot be written"),
        (("gisp.export", f"run_dir={run_dir}", "sparsity=0.3", "format=gguf", f"out={tmp_path / 'file' / 'x.gguf'}"),
         "is a file, not a folder"),
        (("gisp.run", *SMOKE, "logger=none", f"store_dir={tmp / 'store'}", f"hydra.run.dir={tmp_path / 'file'}"),
         "is a file, not a run dir"),
        (("gisp.run", *SMOKE, "logger=none", f"store_dir={tmp_path / 'file' / 'store'}",
          f"hydra.run.dir={tmp_path / 'r1'}"), "store_dir"),
        (("gisp.run", *SMOKE, "logger=none", "store_dir=/proc/gisp_store", f"hydra.run.dir={tmp_path / 'r2'}"),
         "store_dir /proc/gisp_store cannot be written"),
        (("gisp.evaluate", f"run_dir={tmp_path / 'file'}"), "is not a gisp run dir"),
    ]
    procs = [(subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True), text) for args, text in cases]
    for proc, text in procs:
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 2 and text in out and "Traceback" not in out, (text, out[-3000:])
        assert "Loading weights" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no run dir, no lock, no partial export


def test_a_malformed_jsonl_line_is_named_without_a_field_hint(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(GispError) as refused:
        read_jsonl(path, ("text",), "; set text_field to one of them")
    assert f"{path}:2 is not a JSON record" in str(refused.value) and "text_field" not in str(refused.value)
    path.write_text('{"body": "no text field"}\n')
    with pytest.raises(GispError, match=r"lacks field\(s\) \['text'\] \(fields: \['body'\]\); set text_field"):
        read_jsonl(path, ("text",), "; set text_field to one of them")


# ---------------------------------------------------------------------------------------------------------------
# Stops and failures: the message says what was kept and how to go on


def test_each_command_says_what_its_stop_kept(tmp_path, monkeypatch, caplog):
    from gisp import cli, evaluate, export

    caplog.set_level(logging.ERROR, logger="gisp")
    monkeypatch.setattr(sys, "argv", ["gisp/evaluate.py", "run_dir=R", "eval=cmqa"])

    def stopped():
        raise Interrupted(signal.SIGTERM)

    for message, must in ((evaluate.stop_message, "run the same command to evaluate the rest"),
                          (export.stop_message, "nothing was exported")):
        with pytest.raises(SystemExit) as code:
            user_errors(stopped, stop_message=message, resumable=False)()
        assert code.value.code == 128 + signal.SIGTERM
        assert must in caplog.text and "trajectory keeps" not in caplog.text and "hydra.run.dir" not in caplog.text
        caplog.clear()
    (tmp_path / "results.json").write_text(json.dumps({"complete": True}))  # the signal came after results.json
    monkeypatch.setattr(cli, "hydra_output_dir", lambda: tmp_path)
    assert "was complete" in cli.run_stop_message("SIGTERM")
    (tmp_path / "results.json").write_text(json.dumps({"complete": False}))
    assert "Resume with" in cli.run_stop_message("SIGTERM")


def test_a_killed_ddp_peer_ends_in_one_line_with_the_resume_command(tmp_path):
    args = [sys.executable, "-m", "gisp.run", "model=tiny_llama", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "logger=none", "eval=none", "sparsity=0.6", "schedule.steps=40", "data.n_samples=64",
            "data.seq_len=64", "threads=1", f"hydra.run.dir={tmp_path / 'run'}", f"store_dir={tmp_path / 'store'}",
            f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 2:" in line:
            break
    peers = subprocess.run(["pgrep", "-f", f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                           check=False)
    others = [int(p) for p in peers.stdout.split() if int(p) != proc.pid]
    assert others, "".join(seen)[-2000:]
    for pid in others:  # rank 1 dies (out of memory, a node failure)
        os.kill(pid, signal.SIGKILL)
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 2, out[-3000:]
    assert "another process of this multi-process run stopped" in out and "resume with:" in out, out[-3000:]
    assert "Traceback" not in out.split("another process of this multi-process run stopped")[-1]
    assert not (tmp_path / "run" / "results.json").exists()
