"""A run dir never lies: one writer at a time, refused commands change nothing, results keep what was added,
damaged files are named, kills and resumes keep the masks exact."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import stat
import subprocess
import sys
import time

import pytest
from conftest import REPO, SMOKE, compose

from gisp.config import load_settings
from gisp.deploy import evaluate_run
from gisp.errors import GispError
from gisp.eval.suite import eval_task_specs
from gisp.io import read_json
from gisp.pipeline import run
from gisp.runs import RunDir


def _cfg(tmp_path, *overrides):
    return compose("config", *["logger=none", f"cache_dir={tmp_path / 'cache'}",
                                        f"store_dir={tmp_path / 'store'}", *SMOKE, *overrides])


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    results = run(load_settings(_cfg(tmp, "sparsity=[0.3,0.5]")), tmp / "run")
    return tmp, tmp / "run", results


@pytest.mark.e2e
def test_a_second_command_on_a_run_dir_is_refused_at_once(finished):
    tmp, run_dir, _ = finished
    script = ("import signal, sys, time\nfrom gisp.io import FolderLock\n"
              f"lock = FolderLock({str(run_dir)!r})\nlock.acquire()\n"
              "signal.signal(signal.SIGTERM, lambda *a: (lock.release(), sys.exit(0)))\n"
              "print('held', flush=True)\ntime.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(run_dir)
        started = time.monotonic()
        with pytest.raises(GispError, match="in use by another gisp command"):
            run(load_settings(_cfg(tmp, "sparsity=[0.3,0.5]")), run_dir)
        assert time.monotonic() - started < 1.0
        assert _snapshot(run_dir) == before
    finally:
        holder.terminate()  # a clean release: the next tests see the run dir as gisp.run left it
        holder.wait()


def test_refused_commands_leave_the_run_dir_as_they_found_it(finished, tmp_path):
    tmp, run_dir, _ = finished
    before = _snapshot(run_dir)
    with pytest.raises(GispError, match="another configuration"):
        run(load_settings(_cfg(tmp, "sparsity=[0.3,0.5]", "schedule.steps=5")), run_dir)
    with pytest.raises(GispError, match="not reachable"):
        run(load_settings(_cfg(tmp, "sparsity=0.9")), run_dir)
    assert _snapshot(run_dir) == before
    with pytest.raises(GispError, match="not reachable"):
        run(load_settings(_cfg(tmp_path, "sparsity=0.9")), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_rerun_keeps_added_levels_and_sums_time(finished):
    tmp, run_dir, first = finished
    tasks = eval_task_specs(_cfg(tmp)["eval"])
    added = evaluate_run(run_dir, tasks, [0.2], dense=False, progress=False)
    assert added["targets"]["0.2"]["added_by"] == "gisp.evaluate"
    again = run(load_settings(_cfg(tmp, "sparsity=[0.3,0.5]")), run_dir)  # a resubmitted job
    assert "0.2" in again["targets"] and again["targets"]["0.2"]["metrics"] == added["targets"]["0.2"]["metrics"]
    assert again["targets"]["0.3"]["metrics"] == first["targets"]["0.3"]["metrics"]  # not re-evaluated
    invocations = read_json(run_dir / "invocations.json")
    assert len(invocations) >= 2
    assert read_json(run_dir / "results.json")["seconds"] == pytest.approx(sum(i["seconds"] for i in invocations),
                                                                          abs=0.2)


def test_other_evaluation_settings_are_never_mixed(finished):
    tmp, run_dir, _ = finished
    fewer = eval_task_specs(_cfg(tmp, "eval.tasks.wikitext2_ppl.max_windows=4")["eval"])
    before = _snapshot(run_dir)
    with pytest.raises(GispError, match="n_windows"):
        evaluate_run(run_dir, fewer, [0.3], dense=False, progress=False)  # 0.5 and dense keep 8 windows
    assert _snapshot(run_dir) == before
    levels = sorted(float(k) for k in read_json(run_dir / "results.json")["targets"])
    out = evaluate_run(run_dir, fewer, levels, dense=True, progress=False)  # every level again: consistent
    assert out["evaluation"]["wikitext2_ppl"]["n_windows"] == 4
    hashes = {e["evaluated"]["wikitext2_ppl"] for e in [out["dense"], *out["targets"].values()]}
    assert len(hashes) == 1


def test_resume_with_changed_data_is_refused(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("Some calibration text. " * 400)
    overrides = ["data=local_text", f"data.text.local_files=[{text}]", "eval=none", "sparsity=0.4",
                 "prune.max_steps_per_run=1"]
    assert run(load_settings(_cfg(tmp_path, *overrides)), tmp_path / "run") is None
    text.write_text("Other calibration text! " * 400)
    with pytest.raises(GispError, match="calibration data changed"):
        run(load_settings(_cfg(tmp_path, *overrides)), tmp_path / "run")


def test_calibration_longer_than_the_model_positions_is_refused(tmp_path):
    with pytest.raises(GispError, match="data.seq_len"):
        run(load_settings(_cfg(tmp_path, "model.config.max_position_embeddings=16", "eval=none")), tmp_path / "r")


def test_damaged_files_are_named(finished, tmp_path):
    _, run_dir, _ = finished
    traj = RunDir(run_dir).trajectory
    masks = traj.directory / traj.steps[1]["masks"]
    original = masks.read_bytes()
    try:
        masks.write_bytes(original[: len(original) // 2])  # truncated
        with pytest.raises(GispError, match=str(masks.name)):
            RunDir(run_dir).trajectory.masks_at(traj.steps[1]["step"])
    finally:
        masks.write_bytes(original)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trajectory.json").write_text("{not json")
    with pytest.raises(GispError, match="not valid JSON"):
        _ = RunDir(tmp_path / "bad").trajectory
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(GispError, match="not UTF-8"):
        run(load_settings(_cfg(tmp_path, "data=local_text", f"data.text.local_files=[{binary}]", "eval=none")),
            tmp_path / "b")


def test_identical_runs_write_identical_bytes_with_normal_modes(finished, tmp_path):
    _, run_dir, _ = finished
    run(load_settings(_cfg(tmp_path, "sparsity=[0.3,0.5]")), tmp_path / "twin")
    a, b = RunDir(run_dir).trajectory, RunDir(tmp_path / "twin").trajectory
    for sa, sb in zip(a.steps, b.steps, strict=True):
        assert (a.directory / sa["masks"]).read_bytes() == (b.directory / sb["masks"]).read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "twin" / "results.json").stat().st_mode)
    assert mode == 0o666 & ~umask


@pytest.mark.e2e
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_masks(tmp_path):
    slow = [*SMOKE, "sparsity=[0.3,0.6]", "schedule.steps=12", "data.n_samples=48", "data.seq_len=96", "eval=none",
            f"store_dir={tmp_path / 'store'}", f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    args = [sys.executable, "-m", "gisp.run", *slow]
    rng = random.Random(7)
    for _ in range(3):
        proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(8.0, 16.0))  # past the start-up, somewhere in the scoring passes
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = [a.replace(str(tmp_path / "store"), str(tmp_path / "ref_store")).replace(str(tmp_path / "run"),
                                                                                 str(tmp_path / "ref"))
           for a in args]
    assert subprocess.run(ref, cwd=REPO, capture_output=True, timeout=900, check=False).returncode == 0
    killed, clean = RunDir(tmp_path / "run").trajectory, RunDir(tmp_path / "ref").trajectory
    assert len(killed.steps) == len(clean.steps)
    for s in killed.steps:
        a, b = killed.masks_at(s["step"]), clean.masks_at(s["step"])
        assert a.heads.equal(b.heads) and a.channels.equal(b.channels)
    assert read_json(tmp_path / "run" / "results.json")["complete"]


@pytest.mark.e2e
def test_cli_refusals_leave_no_trace(finished, tmp_path):
    """Through the command line too: Hydra's own records (.hydra/, run.log) are written only once the checks
    passed, so a refused gisp.run changes nothing in an existing run dir and leaves no new one behind."""
    tmp, run_dir, _ = finished
    common = [sys.executable, "-m", "gisp.run", *SMOKE, "logger=none", f"cache_dir={tmp / 'cache'}",
              f"store_dir={tmp / 'store'}"]
    before = _snapshot(run_dir)
    other = subprocess.run([*common, "sparsity=[0.3,0.5]", "schedule.steps=5", f"hydra.run.dir={run_dir}"],
                           cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert other.returncode == 2 and "another configuration" in other.stdout + other.stderr
    assert _snapshot(run_dir) == before and not (run_dir / ".hydra").exists()
    typo = subprocess.run([*common, "sparsity=0.9", f"hydra.run.dir={tmp_path / 'new'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert typo.returncode == 2 and "not reachable" in typo.stdout + typo.stderr
    assert not (tmp_path / "new").exists()
    fresh = subprocess.run([*common, "sparsity=0.3", "eval=none", f"hydra.run.dir={tmp_path / 'ok'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=300, check=False)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    overrides = (tmp_path / "ok" / ".hydra" / "overrides.yaml").read_text()
    assert "sparsity=0.3" in overrides and (tmp_path / "ok" / ".hydra" / "config.yaml").is_file()
    log = (tmp_path / "ok" / "run.log").read_text()
    assert "memory plan: tiny_mistral" in log and "trajectory" in log  # lines from before the checks passed too


def test_export_checks_before_loading_weights(finished, tmp_path, monkeypatch):
    """Masks of another model, a missing or unwritable output path: refused before any weight is loaded."""
    from gisp import deploy as export
    from gisp.config import model_spec

    tmp, run_dir, _ = finished

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the checks")

    monkeypatch.setattr(export, "load_model_and_tokenizer", no_loading)
    masks = RunDir(run_dir).trajectory.directory / RunDir(run_dir).trajectory.steps[0]["masks"]
    bigger = model_spec(_cfg(tmp, "model=tiny_llama", "model.config.num_hidden_layers=2")["model"])
    with pytest.raises(GispError, match=r"holds masks for 4 layers .* has 2 x 4 x 128"):
        export.export_from_masks(masks, bigger, tmp_path / "out", tmp / "cache")
    with pytest.raises(GispError, match="add out=PATH"):
        export.export_from_masks(masks, bigger, None, tmp / "cache")
    (tmp_path / "file").write_text("x")
    with pytest.raises(GispError, match="is a file, not a folder"):
        export.export_from_masks(masks, bigger, tmp_path / "file" / "out", tmp / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_export_removes_what_a_killed_export_left(finished, tmp_path):
    """A temp folder of a writer that is gone (SIGKILL mid-export) is removed by the next export to the same place;
    one of a live writer is kept."""
    from gisp.deploy import export_from_run
    from gisp.io import _temp_prefix

    tmp, run_dir, _ = finished
    out = tmp_path / "compact"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / _temp_prefix(out).replace(f".{os.getpid()}-", f".{int(dead.stdout)}-")
    (stale.with_name(stale.name + "abc123")).mkdir()
    (stale.with_name(stale.name + "abc123") / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / (_temp_prefix(out) + "xyz789")
    live.mkdir()
    export_from_run(run_dir, out, sparsity=0.3, cache_dir=tmp / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["compact", live.name])


def test_csv_log_of_a_resumed_run_is_one_file(tmp_path):
    """Lightning's CSVLogger would start a new version folder per invocation (or delete the file on reuse): gisp's
    appends, so the curves of all invocations and the evaluation are in one metrics.csv."""
    import csv

    overrides = ["logger=csv", "sparsity=0.4", "prune.max_steps_per_run=2"]
    assert run(load_settings(_cfg(tmp_path, *overrides)), tmp_path / "run") is None  # stopped after 2 steps
    results = run(load_settings(_cfg(tmp_path, *overrides[:2])), tmp_path / "run")
    files = list((tmp_path / "run").rglob("metrics.csv"))
    assert files == [tmp_path / "run" / "csv" / "metrics.csv"]
    rows = list(csv.DictReader(files[0].open()))
    steps = {int(r["step"]) for r in rows}
    last = RunDir(tmp_path / "run").trajectory.last_step
    assert {1, 2, last} <= steps and last > 2
    assert any(r.get("eval/wikitext2_ppl") for r in rows) and results["complete"]
