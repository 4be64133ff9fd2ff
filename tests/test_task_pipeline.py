"""Task-aligned pruning end to end on a tiny model: CMQA margin calibration, the evaluation suite, gisp.evaluate."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, compose

from gisp.config import load_settings
from gisp.data.multiple_choice import CMQA_TASKS
from gisp.deploy import evaluate_run
from gisp.errors import GispError
from gisp.eval.suite import eval_task_specs
from gisp.io import read_json
from gisp.pipeline import run
from gisp.prune.masks import Masks
from gisp.runs import RunDir

CMQA_METRICS = {"boolq_acc", "piqa_acc_norm", "hellaswag_acc_norm", "winogrande_acc", "arc_easy_acc_norm",
                "arc_challenge_acc_norm", "openbookqa_acc_norm", "cmqa_mean"}
SUITE = ["eval=[wikitext2,cmqa]", "eval.tasks.cmqa.limit=2", "eval.tasks.cmqa.batch_size=4",
         "eval.tasks.wikitext2_ppl.max_windows=4", "eval.tasks.wikitext2_ppl.seq_len=64",
         "eval.tasks.wikitext2_ppl_2048.max_windows=1"]
MARGIN = ["data=cmqa", "objective=margin", "data.budget_tokens=14000", "data.batch_size=8"]  # byte tokens


@pytest.fixture(scope="module")
def margin_run(tmp_path_factory):
    
    tmp = tmp_path_factory.mktemp("margin")
    cfg = compose("config", *["model=tiny_llama", "model.config.max_position_embeddings=1024",
                                       "sparsity=[0.2,0.4]", "logger=csv", "progress=false",
                                       "threads=1", f"cache_dir={tmp / 'cache'}", f"store_dir={tmp / 'store'}",
                                       *MARGIN, *SUITE])
    return tmp / "run", run(load_settings(cfg), run_dir=tmp / "run")


@pytest.mark.e2e
def test_results_hold_both_perplexities_and_every_task(margin_run):
    run_dir, results = margin_run
    for entry in [results["dense"], *results["targets"].values()]:
        metrics = entry["metrics"]
        assert {"wikitext2_ppl", "wikitext2_ppl_2048"} | CMQA_METRICS <= set(metrics)
        assert all(0.0 <= metrics[m] <= 1.0 for m in CMQA_METRICS)
    evaluation = results["evaluation"]
    assert evaluation["wikitext2_ppl"]["seq_len"] == 64
    assert evaluation["wikitext2_ppl_2048"]["seq_len"] == 1024  # capped at the model's 1024 positions
    assert "wikitext-2-raw-v1" in evaluation["wikitext2_ppl"]["variant"]
    assert all(t["n_evaluated"] == 2 and t["part"] == "evaluation" for t in evaluation["cmqa"]["tasks"].values())
    calib = results["calibration"]
    assert calib["kind"] == "multiple_choice" and calib["objective"] == "margin"
    assert set(calib["tasks"]) == set(CMQA_TASKS)
    assert all(t["tokens"] <= 14000 // 7 for t in calib["tasks"].values())
    assert calib["n_gold"] < calib["n_sequences"]  # every option of a sampled question
    assert (run_dir / "metrics.png").stat().st_size > 1000


@pytest.mark.e2e
def test_evaluate_adds_levels_without_pruning_again(margin_run, tmp_path):
    run_dir, results = margin_run
    traj = RunDir(run_dir).trajectory
    level = 0.33  # not a target of the run, not a step of the trajectory: read out exactly
    
    cfg = compose("evaluate", *[f"run_dir={run_dir}", "eval=wikitext2", "logger=none",
                                         "eval.tasks.wikitext2_ppl.max_windows=4",
                                         "eval.tasks.wikitext2_ppl.seq_len=64",
                                         "eval.tasks.wikitext2_ppl_2048.max_windows=1"])
    before = traj.path.read_text()
    out = evaluate_run(run_dir, eval_task_specs(cfg["eval"]), [level, 0.4], dense=False, progress=False)
    assert traj.path.read_text() == before  # no new step: nothing pruned
    key = f"{level:g}"
    entry = out["targets"][key]
    meta = traj.manifest["meta"]["structure"]
    assert abs(entry["sparsity"] - level) <= max(meta["head_params"], meta["channel_params"]) / meta["decoder_params"]
    assert entry["added_by"] == "gisp.evaluate" and (run_dir / entry["masks"]).exists()
    assert Masks.load(run_dir / entry["masks"]).is_nested_in(Masks.load(run_dir / out["targets"]["0.2"]["masks"]))
    # The re-evaluated target keeps its CMQA metrics and gets the same perplexity as during the run.
    target = out["targets"]["0.4"]["metrics"]
    assert CMQA_METRICS <= set(target)
    assert target["wikitext2_ppl"] == pytest.approx(results["targets"]["0.4"]["metrics"]["wikitext2_ppl"], rel=1e-6)
    assert read_json(run_dir / "results.json") == out
    with pytest.raises(GispError, match="not a level of this trajectory"):
        evaluate_run(run_dir, eval_task_specs(cfg["eval"]), [0.9], progress=False)


@pytest.mark.e2e
def test_evaluate_cli_and_bad_input(margin_run):
    run_dir, _ = margin_run
    proc = subprocess.run([sys.executable, "-m", "gisp.evaluate", f"run_dir={run_dir}", "sparsity=[0.2]", "eval=none",
                           "logger=none"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "nothing to evaluate" in proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gisp.evaluate", f"run_dir={run_dir}", "split_seed=7",
                           "logger=none"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and "split_seed" in proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides, match", [
    (["data=wikitext2", "objective=margin"], "multiple-choice data"),
    (["data=cmqa", "data.tasks=[boolq,nosuchtask]"], "nosuchtask"),
    (["data=cmqa", "eval=cmqa", "eval.tasks.cmqa.split_seed=5"], "split_seed"),
    (["data=cmqa", "data.source=local", "data_dir=TMP", "eval=none"], "not found|missing|no local"),
])
def test_task_bad_input_fails_early(compose_cfg, tmp_path, overrides, match):
    overrides = [o.replace("TMP", str(tmp_path)) for o in overrides]
    with pytest.raises(GispError, match=match):
        run(load_settings(compose_cfg("model=tiny_llama", "sparsity=0.2", *overrides)), run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "results.json").exists()
