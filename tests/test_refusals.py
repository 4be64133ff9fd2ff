"""The fault probe as a property: for every command (run, evaluate, export, recover) and every refusal path, the
command exits with code 2 and one line that names the fix, without a traceback, and the run dir and the store are
byte-identical before and after. Then the behaviours the probe found missing: recovering a level the run never
recorded, changing the evaluation protocol of a run dir that holds recoveries, checked recovery artefacts, models known
by their content, sweeps that survive a failing job."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, tiny_model

from gisp.io import FolderLock, read_json

pytestmark = pytest.mark.e2e

TINY = [*SMOKE, "logger=none", "progress=false", "threads=1"]
SMALL_RECOVERY = ["recover.tokens=1024", "recover.seq_len=32", "recover.batch_size=4", "recover.val_every=4",
                  "recover.val_tokens=256"]


def cli(*args: str, timeout: int = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots`: folders by name, files by the sha256 of their bytes, links by target."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            key = f"{root.name}/{p.relative_to(root)}"
            if p.is_symlink():
                out[key] = f"-> {p.readlink()}"
            elif p.is_dir():
                out[key] = "dir"
            else:
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny run (levels 0.3 and 0.5) with a LoRA recovery of 0.5, in its own store."""
    tmp = tmp_path_factory.mktemp("refusals")
    run_dir, store = tmp / "run", tmp / "store"
    where = [f"hydra.run.dir={run_dir}", f"store_dir={store}", f"cache_dir={tmp / 'cache'}"]
    ok(cli("gisp.run", *TINY, "sparsity=[0.3,0.5]", *where))
    ok(cli("gisp.recover", f"run_dir={run_dir}", "sparsity=[0.5]", "recover=lora", *SMALL_RECOVERY, "threads=1",
           "progress=false"))
    broken = tmp / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": ')  # cut short
    return {"tmp": tmp, "run": run_dir, "store": store, "where": where, "broken": broken}


# (command, arguments, text the one line must hold): {run}, {store}, {tmp}, {broken} are the world's paths
REFUSALS = [
    ("gisp.run", ["foo=1"], "Could not override 'foo'"),
    ("gisp.run", ["model=no_such_model"], "Could not find 'model/no_such_model'"),
    ("gisp.run", ["sparsity=[0.3,0.5]", "recover=lora", "recover.data=wikitext2"], "+data@recover.data=wikitext2"),
    ("gisp.run", ["recover=lora", "recover.tokens=1000000000000"], "lower recover.tokens"),
    ("gisp.run", ["recover=lora", "recover.seq_len=4096", "model.config.max_position_embeddings=512"],
     "set recover.seq_len to at most 512"),
    ("gisp.run", ["pruner=owl", "sparsity=[0.5]", "pruner.options.outlier_lambda=0.45"], "use outlier_lambda below"),
    ("gisp.run", ["model=hf", "model.path={broken}"], "is not valid JSON"),
    ("gisp.run", ["sparsity=0.9"], "is not reachable"),
    ("gisp.run", ["pruner=slimgpt", "reconstruct=lsq"], "use reconstruct=none with slimgpt"),
    ("gisp.run", ["reconstruct=lsq", "reconstruct.target=dense_model"], "reconstruct.target must be dense or local"),
    ("gisp.run", ["compact_eval=maybe"], "compact_eval must be true or false"),
    ("gisp.run", ["pruner=slimgpt", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
     "computes each level layer by layer in one process"),
    ("gisp.evaluate", ["run_dir={run}", "reconstruct=lsq"], "a run dir holds one reconstruction of its levels"),
    ("gisp.evaluate", ["run_dir={run}", "compact_eval=maybe"], "compact_eval must be true or false"),
    ("gisp.evaluate", ["run_dir={run}", "sparsity=[0.99]"], "extend it with gisp.run"),
    ("gisp.evaluate", ["run_dir={run}", "split_seed=7"], "use split_seed=1234"),
    ("gisp.evaluate", ["run_dir={run}", "recovered=nope"], "(recovered: ['lora'])"),
    ("gisp.evaluate", ["run_dir={run}", "bar=2"], "Could not override 'bar'"),
    ("gisp.evaluate", ["run_dir={tmp}"], "is not a gisp run dir"),
    ("gisp.export", ["run_dir={run}", "sparsity=0.99", "out={tmp}/x"], "never reached sparsity 0.99"),
    ("gisp.export", ["run_dir={run}", "sparsity=[0.3,0.5]", "out={tmp}/x"], "gisp.export writes one level"),
    ("gisp.export", ["run_dir={run}", "sparsity=0.5", "recovered=nope", "out={tmp}/x"], "(recovered: ['lora'])"),
    ("gisp.export", ["run_dir={run}", "sparsity=0.5", "out={run}"], "already exists"),
    ("gisp.recover", ["run_dir={run}", "sparsity=[0.99]"], "extend it with gisp.run"),
    ("gisp.recover", ["run_dir={run}", "recover.data=wikitext2"], "+data@recover.data=wikitext2"),
    ("gisp.recover", ["run_dir={run}", "recover.tokens=1000000000000"], "lower recover.tokens"),
    ("gisp.recover", ["run_dir={run}", "recover.seq_len=10000000"], "set recover.seq_len to at most"),
    ("gisp.recover", ["run_dir={run}", "recover.name=../x"], "must be a plain folder name"),
    ("gisp.recover", ["run_dir={run}", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"],
     "does not train under trainer=fsdp"),
    ("gisp.recover", ["run_dir={run}", "recover.lr=fast"], "recover.lr must be a number"),
]


def test_every_refusal_is_one_line_exit_2_and_changes_nothing(world, tmp_path):
    """Every case of REFUSALS as a user types it, four at a time (each is its own process): exit code 2, the line that
    names the fix, no traceback; and the run dir, the store and their folder are byte-identical afterwards (a case
    that wrote anything would change the snapshot, whichever it was). Cases running side by side in one run dir would
    be refused for its lock instead (a refusal may come after the command claimed the run dir): each case gets a run
    dir of its own, a byte copy of the world's for the commands on a run dir, a new path for gisp.run (which it must
    never create)."""
    before = snapshot(world["run"], world["store"])
    run_before = snapshot(world["run"])
    listing = sorted(p.name for p in world["tmp"].iterdir())
    failures, copies = [], []
    for start in range(0, len(REFUSALS), 4):
        running = []
        for i, (command, args, text) in enumerate(REFUSALS[start:start + 4], start):
            paths = {k: str(v) for k, v in world.items() if isinstance(v, Path)}
            if command == "gisp.run":
                extra = [*TINY, *world["where"][1:], f"hydra.run.dir={world['tmp'] / f'case{i}'}"]
            else:
                copy = tmp_path / f"case{i}" / "run"
                shutil.copytree(world["run"], copy, symlinks=True)
                copies.append(copy)
                paths["run"] = str(copy)
                extra = [f"store_dir={world['store']}"]
            argv = [sys.executable, "-m", command, *extra, *(a.format(**paths) for a in args)]
            running.append((command, args, text, subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE,
                                                                  stderr=subprocess.STDOUT, text=True)))
        for command, args, text, proc in running:
            out = proc.communicate(timeout=600)[0]
            if proc.returncode != 2 or text not in out or "Traceback" in out:
                failures.append(f"{command} {' '.join(args)} (exit {proc.returncode}):\n{out[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert snapshot(world["run"], world["store"]) == before
    assert all(snapshot(copy) == run_before for copy in copies)
    assert sorted(p.name for p in world["tmp"].iterdir()) == listing  # nothing new beside them either


def test_a_locked_run_dir_refuses_every_command_and_leaves_no_trace(world):
    """gisp.evaluate refused for the lock no longer leaves RUN/evaluate/<time>/ behind; neither does any other."""
    run_dir = world["run"]
    before = snapshot(run_dir, world["store"])
    lock = FolderLock(run_dir)
    assert lock.acquire(blocking=False)
    try:
        for command, args in (("gisp.evaluate", [f"run_dir={run_dir}"]),
                              ("gisp.recover", [f"run_dir={run_dir}", *SMALL_RECOVERY]),
                              ("gisp.run", [*TINY, "sparsity=[0.3,0.5]", *world["where"]])):
            proc = cli(command, *args)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 2 and "is in use by another gisp command" in out, (command, out[-2000:])
        before.pop("run/.gisp.lock", None)
        after = snapshot(run_dir, world["store"])
        after.pop("run/.gisp.lock", None)
        assert after == before
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------------------
# Recovery: a level never recorded, a protocol change, artefacts checked


def test_recovering_a_level_the_run_never_recorded(world, tmp_path):
    """sparsity=[0.4] on a run of 0.3 and 0.5: the level is read out, recorded like gisp.evaluate records one, and
    recovered; gisp.run and gisp.evaluate keep working on the run dir."""
    run_dir = tmp_path / "run"
    shutil.copytree(world["run"], run_dir)
    ok(cli("gisp.recover", f"run_dir={run_dir}", "sparsity=[0.4]", "recover=lora", "recover.name=extra",
           *SMALL_RECOVERY, "threads=1", "progress=false"))
    entry = read_json(run_dir / "results.json")["targets"]["0.4"]
    assert abs(entry["sparsity"] - 0.4) < 0.01 and entry["masks"] == "levels/level_0.4.safetensors"
    assert entry["added_by"] == "gisp.recover" and entry["recovered"]["extra"]["metrics"]
    ok(cli("gisp.run", *TINY, "sparsity=[0.3,0.5]", f"hydra.run.dir={run_dir}", f"store_dir={world['store']}",
           f"cache_dir={world['tmp'] / 'cache'}"))
    ok(cli("gisp.evaluate", f"run_dir={run_dir}", "logger=none", "progress=false"))


def test_a_run_dir_with_a_recovery_changes_its_protocol_with_the_one_command_named(world, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(world["run"], run_dir)
    new = ["eval=wikitext2_smoke", "eval.tasks.wikitext2_ppl.max_windows=3", "logger=none", "progress=false"]
    proc = cli("gisp.evaluate", f"run_dir={run_dir}", "sparsity=[0.3]", *new)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "recovered=all" in out, out[-3000:]
    named = next(line.strip() for line in out.splitlines() if line.strip().startswith("python -m gisp.evaluate"))
    assert "sparsity=[0.3,0.5]" in named and "dense=true" in named
    args = [a.strip("'") for a in named.split()[3:]]
    ok(cli("gisp.evaluate", *args, "logger=none", "progress=false"))
    results = read_json(run_dir / "results.json")
    assert results["complete"] and "mixed_protocols" not in results
    assert results["targets"]["0.5"]["recovered"]["lora"]["evaluated"] == results["targets"]["0.5"]["evaluated"]
    # without eval=, a recovered level is measured with the run's own protocol (the one now recorded)
    ok(cli("gisp.evaluate", f"run_dir={run_dir}", "recovered=lora", "logger=none", "progress=false"))
    assert not read_json(run_dir / "results.json").get("mixed_protocols")


def test_recovery_artefacts_are_checked(world, tmp_path):
    """A deleted adapter is trained again by the same command (which says why); edited recovered weights are refused
    by evaluate and export with the fix; a recovered/<name> link out of the run dir is refused."""
    run_dir = tmp_path / "run"
    shutil.copytree(world["run"], run_dir)
    adapter = run_dir / "recovered" / "lora" / "level_0.5" / "adapter"
    shutil.rmtree(adapter)
    out = ok(cli("gisp.recover", f"run_dir={run_dir}", "sparsity=[0.5]", "recover=lora", *SMALL_RECOVERY,
                 "threads=1", "progress=false"))
    assert "is missing: training it again" in out and (adapter / "adapter_model.safetensors").is_file()
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    for command, args in (("gisp.evaluate", ["recovered=lora", "logger=none"]),
                          ("gisp.export", ["sparsity=0.5", "recovered=lora", f"out={tmp_path / 'x'}"])):
        proc = cli(command, f"run_dir={run_dir}", *args)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "changed since it was trained" in text and "Traceback" not in text, text
        assert "Run the recovery again" in text
    assert not (tmp_path / "x").exists()
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run_dir / "recovered" / "lora", elsewhere)
    (run_dir / "recovered" / "lora").symlink_to(elsewhere)
    proc = cli("gisp.evaluate", f"run_dir={run_dir}", "recovered=lora", "logger=none")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "outside the run dir" in text, text[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Models by their content; sweeps that survive a failing job


def _save(folder: Path, seed: int) -> None:
    from gisp.models.byte_tokenizer import byte_level_tokenizer

    tiny_model("llama", seed=seed).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)


def test_a_model_folder_whose_weights_change_is_another_model(tmp_path):
    folder = tmp_path / "my-model"
    _save(folder, seed=0)
    common = ["model=hf", f"model.path={folder}", "data.n_samples=8", "data.seq_len=32", "eval=wikitext2_smoke",
              "sparsity=[0.3]", "logger=none", "progress=false", "threads=1", f"store_dir={tmp_path / 'store'}",
              f"cache_dir={tmp_path / 'cache'}"]
    ok(cli("gisp.run", *common, f"hydra.run.dir={tmp_path / 'first'}"))
    first = read_json(tmp_path / "first" / "results.json")["trajectory"]
    _save(folder, seed=1)  # re-saved with other weights under the same path
    ok(cli("gisp.run", *common, f"hydra.run.dir={tmp_path / 'second'}"))
    second = read_json(tmp_path / "second" / "results.json")["trajectory"]
    assert second["id"] != first["id"] and second["reused_steps"] == []  # computed anew, not extended
    proc = cli("gisp.evaluate", f"run_dir={tmp_path / 'first'}", "logger=none")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "changed since" in out and "Traceback" not in out, out[-2000:]
    manifest = json.loads((Path(first["path"]) / "manifest.json").read_text())
    assert manifest["definition"]["model_identity"]["kind"] == "sampled-sha256/v1"


def test_a_failing_job_does_not_stop_a_sweep(tmp_path):
    """sparsity=0.3,0.99: the 0.99 job is refused (not reachable); the others run, summary.md names the failed job,
    and the multirun exits 1. With the parallel launcher the job beside the failing one finishes too."""
    for launcher in ([], ["hydra/launcher=parallel"]):
        sweep = tmp_path / ("parallel" if launcher else "basic")
        proc = cli("gisp.run", "-m", *TINY, "sparsity=0.3,0.99,0.5", *launcher, f"hydra.sweep.dir={sweep}",
                   f"store_dir={tmp_path / 'store'}", f"cache_dir={tmp_path / 'cache'}")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]
        done = sorted(key for p in sweep.glob("*/results.json") if read_json(p).get("complete")
                      for key in read_json(p)["targets"])
        assert done == ["0.3", "0.5"], out[-3000:]
        summary = (sweep / "summary.md").read_text()
        assert "## Failed jobs" in summary and "sparsity=0.99" in summary and "is not reachable" in summary
        assert "1 job(s) of sweep" in out


def test_shortgpt_says_when_a_level_is_the_dense_model(tmp_path, caplog):
    import logging

    from conftest import compose

    from gisp.config import load_settings
    from gisp.pipeline import run

    caplog.set_level(logging.WARNING)
    cfg = compose("config", *TINY, "pruner=shortgpt", "sparsity=[0.05]", "eval=none",
                  f"store_dir={tmp_path / 'store'}", f"cache_dir={tmp_path / 'cache'}")
    results = run(load_settings(cfg), tmp_path / "run")
    assert results["targets"]["0.05"]["sparsity"] == 0.0
    assert "so this level is the dense model" in caplog.text
