"""Sweeps: one trajectory per definition, exact read-outs at any sparsity, launchers, locks, stopping on signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, SMOKE, compose, compose_hydra

from gisp.config import load_settings
from gisp.deploy import evaluate_run
from gisp.errors import GispError
from gisp.eval.suite import eval_task_specs
from gisp.io import FolderLock, read_json
from gisp.pipeline import run
from gisp.prune.masks import Masks
from gisp.prune.trajectory import Trajectory
from gisp.runs import RunDir

TARGETS = ("0.2", "0.3", "0.4", "0.5")


def _cfg(tmp_path, *overrides, store="store"):
    return compose("config", *["logger=none", f"cache_dir={tmp_path / 'cache'}",
                                        f"store_dir={tmp_path / store}", *SMOKE, *overrides])


def _step_masks(run_dir) -> list[Masks]:
    traj = RunDir(run_dir).trajectory
    return [traj.masks_at(s["step"]) for s in traj.steps]


def _equal(a: Masks, b: Masks) -> bool:
    return a.heads.equal(b.heads) and a.channels.equal(b.channels)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One run to 0.5 with its own store: the reference trajectory."""
    tmp = tmp_path_factory.mktemp("single")
    return tmp / "run", run(load_settings(_cfg(tmp, "sparsity=0.5", "eval=none")), tmp / "run")


def test_a_sparsity_sweep_computes_one_trajectory(single_run, tmp_path):
    """sparsity=0.2,0.3,0.4,0.5 as four jobs: together exactly the scoring passes of one run to 0.5."""
    ref_dir, ref = single_run
    computed, reused = [], []
    for key in TARGETS:
        results = run(load_settings(_cfg(tmp_path, f"sparsity={key}", "eval=none")), tmp_path / key)
        computed += results["trajectory"]["computed_steps"]
        reused += results["trajectory"]["reused_steps"]
        traj = RunDir(tmp_path / key).trajectory
        meta = traj.manifest["meta"]["structure"]
        one = max(meta["head_params"], meta["channel_params"]) / meta["decoder_params"]
        assert abs(results["targets"][key]["sparsity"] - float(key)) <= one  # within one structure
    assert sorted(computed) == list(range(1, ref["trajectory"]["steps"] + 1))  # every step computed once
    assert reused  # later jobs reused what earlier jobs computed
    assert len({read_json(tmp_path / k / "trajectory.json")["id"] for k in TARGETS}) == 1
    for a, b in zip(_step_masks(ref_dir), _step_masks(tmp_path / "0.5"), strict=True):
        assert _equal(a, b)  # extension == an uninterrupted run, bit for bit


def test_targets_are_read_outs(single_run, tmp_path):
    """sparsity=[0.2,0.5] and sparsity=0.5 followed by gisp.evaluate sparsity=[0.2]: the same masks at both levels."""
    ref_dir, _ = single_run
    both = run(load_settings(_cfg(tmp_path, "sparsity=[0.2,0.5]", "eval=none")), tmp_path / "both")
    tasks = eval_task_specs(_cfg(tmp_path)["eval"])
    added = evaluate_run(ref_dir, tasks, [0.2, 0.5], dense=False, progress=False)
    for key in ("0.2", "0.5"):
        a = Masks.load(tmp_path / "both" / both["targets"][key]["masks"])
        b = Masks.load(ref_dir / added["targets"][key]["masks"])
        assert _equal(a, b)
    assert Masks.load(ref_dir / added["targets"]["0.5"]["masks"]).is_nested_in(
        Masks.load(ref_dir / added["targets"]["0.2"]["masks"]))
    assert "0.2" in read_json(ref_dir / "results.json")["targets"]  # the level added later is named in results


def _multirun(tmp_path, name, *extra, env=None):
    args = [sys.executable, "-m", "gisp.run", "-m", "sweep=table4_tiny", "pruner=gisp", "sparsity=0.2,0.3,0.5",
            f"hydra.sweep.dir={tmp_path / name}", f"store_dir={tmp_path / (name + '_store')}",
            f"cache_dir={tmp_path / 'cache'}", *extra]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    jobs = sorted((tmp_path / name).glob("*/results.json"))
    assert len(jobs) == 3
    results = [read_json(p) for p in jobs]
    assert all(r["complete"] for r in results)
    computed = sorted(s for r in results for s in r["trajectory"]["computed_steps"])
    assert computed == list(range(1, max(r["trajectory"]["steps"] for r in results) + 1))  # one trajectory
    return {key: Masks.load(p.parent / r["targets"][key]["masks"]) for p, r in zip(jobs, results)
            for key in r["targets"]}


@pytest.mark.e2e
def test_parallel_and_submitit_launchers_share_one_trajectory(tmp_path):
    """The same sweep with the basic launcher, 2 parallel joblib jobs and submitit's local executor: each computes
    its trajectory once, no job fails, and every launcher gives the same masks."""
    basic = _multirun(tmp_path, "basic")
    parallel = _multirun(tmp_path, "parallel", "hydra/launcher=parallel", env={"GISP_JOBS": "2"})
    local = _multirun(tmp_path, "local", "hydra/launcher=local")
    assert set(basic) == set(parallel) == set(local) == {"0.2", "0.3", "0.5"}
    for key in basic:
        assert _equal(basic[key], parallel[key]) and _equal(basic[key], local[key])
    assert (tmp_path / "basic" / "summary.md").read_text().count("| gisp / ppl / tiny_mistral") == 4


def test_launcher_presets_compose_and_pin_one_gpu_per_job():
    slurm = compose_hydra("config", "hydra/launcher=slurm").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.max_num_timeout > 0
    local = compose_hydra("config", "hydra/launcher=local").hydra.launcher
    assert local._target_.endswith("LocalLauncher")
    node = compose_hydra("config", "hydra/launcher=gpu_node").hydra
    assert node.launcher._target_.endswith("JoblibLauncher") and node.launcher.n_jobs == 8
    node.job.num = 11
    assert node.job.env_set.CUDA_VISIBLE_DEVICES == "3"  # job 11 on an 8-GPU node


def test_wandb_group_and_tags_of_a_sweep_job(tmp_path):
    cfg = _cfg(tmp_path, "logger=wandb", "sparsity=[0.2,0.4]")
    node = load_settings(cfg, sweep="my-sweep").loggers["wandb"]
    assert node["group"] == "my-sweep" and node["offline"] is True
    assert {"model:tiny_mistral", "pruner:gisp", "objective:ppl", "data:austen", "target:0.2"} <= set(node["tags"])
    assert "group" not in load_settings(cfg).loggers["wandb"]  # a single run has no group


def test_another_format_version_is_refused(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "manifest.json").write_text(json.dumps({"format": "gisp-trajectory", "version": 1}))
    with pytest.raises(GispError, match="another gisp trajectory format"):
        Trajectory.load(tmp_path / "t")


@pytest.mark.e2e
def test_lock_waits_for_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="gisp")
    path = tmp_path / "trajectory"
    script = (f"import time\nfrom gisp.io import FolderLock\nlock = FolderLock({str(path)!r})\nlock.acquire()\n"
              "print('held', flush=True)\ntime.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        assert not FolderLock(path, timeout=1.0, poll=0.1).acquire()  # a live holder: wait, then give up
        assert time.monotonic() - started >= 1.0 and "held by pid" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    lock = FolderLock(path, timeout=5)  # the holder died without releasing: the OS freed the lock
    assert lock.acquire()
    assert "gone without releasing" in caplog.text
    lock.release()


def _start(tmp_path, name, *overrides):
    args = [sys.executable, "-m", "gisp.run", *SMOKE, f"hydra.run.dir={tmp_path / name}",
            f"store_dir={tmp_path / (name + '_store')}", f"cache_dir={tmp_path / 'cache'}", *overrides]
    return args, subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, marker: str) -> tuple[int, float, str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            break
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=60)[0]
    return proc.returncode, time.monotonic() - sent, "".join(seen) + rest


@pytest.mark.e2e
@pytest.mark.parametrize("where,marker", [("scoring", "step 3:"), ("evaluation", "evaluating 0.3")])
def test_sigterm_stops_within_seconds_and_the_command_resumes(tmp_path, where, marker):
    slow = ["sparsity=[0.3,0.6]", "schedule.steps=12", "data.n_samples=64", "data.seq_len=128"]
    args, proc = _start(tmp_path, "killed", *slow, "eval.tasks.wikitext2_ppl.max_windows=3000")
    code, seconds, out = _kill_when(proc, marker)
    assert code == 128 + signal.SIGTERM and seconds < 10, out[-2000:]
    assert "Resume with" in out
    results = tmp_path / "killed" / "results.json"
    assert not results.exists() or not read_json(results).get("complete")
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _, ref = _start(tmp_path, "uninterrupted", *slow, "eval=none")
    assert ref.communicate(timeout=900) and ref.returncode == 0
    resumed, uninterrupted = _step_masks(tmp_path / "killed"), _step_masks(tmp_path / "uninterrupted")
    assert len(resumed) == len(uninterrupted)
    assert all(_equal(a, b) for a, b in zip(resumed, uninterrupted))
    assert read_json(results)["complete"]
    torch.testing.assert_close(torch.tensor(read_json(results)["targets"]["0.6"]["sparsity"]),
                               torch.tensor(read_json(tmp_path / "uninterrupted" / "results.json")["targets"]["0.6"]
                                            ["sparsity"]))


def test_a_seed_sweep_is_summarized_with_mean_std_and_noise(tmp_path):
    """seed=0,1 for two methods: one row per method and level with mean +- std (n=2), error bars, and the
    differences within the noise named (the old summary kept one seed per method and dropped the others)."""
    from gisp.sweeps import write_summary

    sweep = tmp_path / "sweep"
    for job, (pruner, seed) in enumerate([(p, s) for p in ("gisp", "wanda_sp") for s in (0, 1)]):
        overrides = [f"pruner={pruner}", f"seed={seed}", "sparsity=[0.3,0.5]"]
        run(load_settings(_cfg(tmp_path, *overrides), overrides=overrides), sweep / str(job))
    write_summary(sweep)
    summary = (sweep / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith(("| gisp", "| wanda_sp"))]
    assert len(rows) == 6  # two methods x (dense, 0.3, 0.5): every seed is in its method's row
    assert all("(n=2)" in row for row in rows if "| 0.5 |" in row)
    seeds = [read_json(sweep / str(j) / "results.json")["targets"]["0.5"]["metrics"]["wikitext2_ppl"] for j in (0, 1)]
    gisp_row = next(row for row in rows if row.startswith("| gisp") and "| 0.5 |" in row)
    assert f"{sum(seeds) / 2:.2f}" in gisp_row  # the mean of the two seeds
    notes = summary.split("## Differences within the noise")[1].strip().splitlines()
    assert notes and all("best " in n and "within the noise of it: " in n for n in notes)  # a comparison per note
    assert (sweep / "summary.png").read_bytes().startswith(b"\x89PNG")
