"""Gradient offload and activation checkpointing are exact, and the gradient bytes they keep are the memory plan's."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import SMOKE, saved_tensor_bytes, tiny_config, tiny_model

from gisp.config import load_settings
from gisp.data.calibration import from_windows
from gisp.lightning.datamodule import CalibrationData
from gisp.lightning.scoring import GradientPass
from gisp.memory.scoring import PlanInputs, build_plan
from gisp.memory.shapes import meta_structure
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.pipeline import run
from gisp.prune.objectives import OBJECTIVES
from gisp.runs import RunDir


def scoring_pass(family: str, dtype: torch.dtype = torch.float32, batch_size: int = 2, **options) -> GradientPass:
    """One Lightning scoring pass over 6 random sequences of a tiny model; the module keeps scores and memory."""
    ids = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(5))
    model = tiny_model(family).to(dtype)
    structure = describe(model)
    module = GradientPass(model, layer_modules(model, family_spec(family)), structure, n_samples=6, **options)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, use_distributed_sampler=False)
    trainer.validate(module, datamodule=CalibrationData(from_windows(ids, OBJECTIVES["ppl"]), batch_size),
                     verbose=False)
    return module


@pytest.mark.parametrize("options", [{"grad_offload": "cpu"}, {"checkpointing": True},
                                     {"grad_offload": "cpu", "checkpointing": True}])
def test_offload_and_checkpointing_give_the_plain_scores(family, options):
    plain = scoring_pass(family)
    other = scoring_pass(family, **options)
    torch.testing.assert_close(other.scores[0], plain.scores[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(other.scores[1], plain.scores[1], rtol=1e-6, atol=0)
    assert other.calib_loss == pytest.approx(plain.calib_loss, rel=1e-12)
    model = other.model
    assert all(p.grad is None for p in model.parameters()) and not other._written  # released after scoring
    assert bool(other._accumulated) == ("grad_offload" in options)  # host buffers are kept for the next pass
    assert not model.model.layers[0].training and not model.model.layers[0].gradient_checkpointing  # switched back


def test_offload_of_a_bf16_model_equals_float32_accumulation():
    """Offload sums the bf16 batch gradients in float32: the same sums as grad_dtype=float32 on the device."""
    on_device = scoring_pass("mistral", torch.bfloat16, batch_size=1, grad_dtype=torch.float32)
    offloaded = scoring_pass("mistral", torch.bfloat16, batch_size=1, grad_offload="cpu")
    assert torch.equal(offloaded.scores[0], on_device.scores[0])
    assert torch.equal(offloaded.scores[1], on_device.scores[1])


def plan_of(family: str, dtype: str, **inputs):
    structure, counts = meta_structure(tiny_config(family), getattr(torch, dtype), {}, "query")
    return build_plan(family, structure, counts, PlanInputs("single", 1, 1, dtype, inputs.pop("grad_dtype", None),
                                                            batch_size=2, seq_len=20, **inputs))


@pytest.mark.parametrize("mode", ["plain", "float32", "offload"])
def test_gradient_bytes_on_device_and_host_are_the_plans(mode):
    """Where the accumulated gradient lives at the end of a pass (before it is freed), measured on the tensors, equals
    the plan's rows: resident device gradient, host buffers, the largest gradient in flight."""
    options = {"plain": {}, "float32": {"grad_dtype": torch.float32}, "offload": {"grad_offload": "cpu"}}[mode]
    module = scoring_pass("mistral", torch.bfloat16, **options)
    plan = plan_of("mistral", "bfloat16", grad_dtype="float32" if mode == "float32" else None,
                   grad_offload=mode == "offload", checkpointing=False)
    measured = module.memory
    assert measured["grad"] + measured["device_buffer"] == plan.device["gradients (resident)"]
    assert measured["host_buffer"] == plan.host.get("gradient buffers", 0)
    if mode == "offload":
        assert measured["grad"] == measured["device_buffer"] == 0 < measured["host_buffer"]
    if mode != "plain":  # each gradient autograd produces is freed by the hook at once: at most one weight's
        assert measured["largest_grad"] == plan.device["gradients (in flight)"]


def test_pipeline_masks_equal_with_offload_and_checkpointing(compose_cfg, tmp_path):
    """End to end on the smoke recipe: the same masks at every step with prune.grad_offload=cpu and
    prune.checkpointing=true as without; the trajectory id ignores both (they change no result); the step records
    carry the throughput and results.json the memory plan."""
    base = [*SMOKE, "model=tiny_llama", "eval=none", "sparsity=0.3"]
    plain = run(load_settings(compose_cfg(*base)), run_dir=tmp_path / "plain")
    other = run(load_settings(compose_cfg(*base, "prune.grad_offload=cpu", "prune.checkpointing=true",
                                          f"store_dir={tmp_path / 'store2'}")), run_dir=tmp_path / "other")
    assert plain["trajectory"]["id"] == other["trajectory"]["id"]
    a, b = RunDir(tmp_path / "plain").trajectory, RunDir(tmp_path / "other").trajectory
    assert [s["step"] for s in a.steps] == [s["step"] for s in b.steps] and len(a.steps) > 3
    for step in a.steps:
        ma, mb = a.masks_at(step["step"]), b.masks_at(step["step"])
        assert ma.heads.equal(mb.heads) and ma.channels.equal(mb.channels)
        assert step["tokens_per_s"] > 0 and step["mfu"] is None  # no GPU: no MFU
    plan = other["memory_plan"]
    assert plan["inputs"]["grad_offload"] and plan["inputs"]["checkpointing"]
    assert plan["device_bytes"]["gradients (resident)"] == 0 and plan["host_bytes_per_node"]["gradient buffers"] > 0


def saved_bytes(model, ids, checkpointing: bool) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward (weights excluded)."""
    from gisp.lightning.checkpointing import checkpoint_layers, training_layers

    model.requires_grad_(True)
    if checkpointing:
        checkpoint_layers(model, "model.layers", True)
    try:
        with training_layers(model, "model.layers", checkpointing):
            return saved_tensor_bytes(model, lambda: model(ids, use_cache=False))
    finally:
        checkpoint_layers(model, "model.layers", False)


def test_checkpointing_keeps_only_layer_inputs():
    model = tiny_model("llama")
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    plain, checkpointed = saved_bytes(model, ids, False), saved_bytes(model, ids, True)
    assert checkpointed < plain / 3  # the layers' internals are recomputed in backward


def test_offload_buffers_are_reused_without_carrying_sums_over():
    """The host buffers survive from pass to pass (pinning is slow); each pass starts its sums afresh."""
    module = scoring_pass("llama", grad_offload="cpu")
    first = [s.clone() for s in module.scores]
    buffers = {k: v.data_ptr() for k, v in module._accumulated.items()}
    module.trainer.validate(module, datamodule=module.trainer.datamodule, verbose=False)
    assert {k: v.data_ptr() for k, v in module._accumulated.items()} == buffers
    assert torch.equal(module.scores[0], first[0]) and torch.equal(module.scores[1], first[1])
