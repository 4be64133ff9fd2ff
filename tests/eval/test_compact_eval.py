"""Levels evaluated as their compact models (compact_eval, the default) give the masked dense model's metrics to
float rounding, under the same protocol hashes: GQA in both modes, FLAP's output biases, a reconstructed level, and
gisp.evaluate of a run dir evaluated the other way."""

from __future__ import annotations

import pytest
from conftest import SMOKE, compose

from gisp.config import load_settings
from gisp.deploy import evaluate_run
from gisp.eval.suite import eval_task_specs
from gisp.pipeline import run

# rel. tolerance of a perplexity: the compact model sums fewer (all nonzero) terms in each matmul than the masked one
RTOL = 1e-4


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    levels = {"dense": results["dense"], **results["targets"]}
    return {k: e["metrics"] for k, e in levels.items()}


@pytest.mark.parametrize("overrides", [
    ("model=tiny_mistral",),  # GQA, query heads
    ("model=tiny_mistral", "prune.gqa_mode=group"),
    ("model=tiny_llama", "pruner=flap"),  # output biases
    ("model=tiny_qwen2", "reconstruct=bias"),
], ids=["gqa-query", "gqa-group", "flap-bias", "qwen2-reconstructed"])
def test_compact_evaluation_equals_the_masked_model(compose_cfg, tmp_path, overrides):
    common = [*overrides, "sparsity=[0.3,0.5]", *SMOKE, f"store_dir={tmp_path / 'store'}"]
    compact = run(load_settings(compose_cfg(*common)), run_dir=tmp_path / "compact")
    masked = run(load_settings(compose_cfg(*common, "compact_eval=false")), run_dir=tmp_path / "masked")
    for key, metrics in _metrics(masked).items():
        assert _metrics(compact)[key] == pytest.approx(metrics, rel=RTOL), key
    assert compact["evaluation"] == masked["evaluation"]  # the same protocols: one series
    assert compact["targets"]["0.5"]["masks"] == masked["targets"]["0.5"]["masks"]


def test_evaluate_switches_between_compact_and_masked(compose_cfg, tmp_path):
    for name in ("a", "b"):  # two run dirs of one trajectory: a level evaluated once is not evaluated again
        run(load_settings(compose_cfg("model=tiny_mistral", "sparsity=[0.4]", *SMOKE, "eval=none")),
            run_dir=tmp_path / name)
    compact = evaluate_run(tmp_path / "a", eval_task_specs(compose("config", *SMOKE)["eval"]), sparsity=[0.35],
                           progress=False)
    masked = evaluate_run(tmp_path / "b", eval_task_specs(compose("config", *SMOKE)["eval"]), sparsity=[0.35],
                          progress=False, compact=False)
    assert compact["targets"]["0.35"]["metrics"]  # evaluated here, not before
    assert compact["targets"]["0.35"]["metrics"] == pytest.approx(masked["targets"]["0.35"]["metrics"], rel=RTOL)
