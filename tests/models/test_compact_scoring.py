"""Compact scoring (prune.compact): GISP's scores computed on a level's compact model equal the masked dense
model's, in the dense indexing, for every registered family in both GQA modes; a trajectory computed compact has
the masked trajectory's masks at every step."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE, saved_tensor_bytes, tiny_model
from test_conformance import FAMILIES, dense, ids

from gisp.compact.scores import compact_scored_weights, compact_structure_scores, scoring_model
from gisp.config import load_settings
from gisp.lightning.checkpointing import checkpoint_layers, training_layers
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.pipeline import run
from gisp.prune.importance import structure_scores
from gisp.prune.masks import MaskApplier, Masks, expand_units
from gisp.prune.objectives import batch_losses
from gisp.runs import RunDir

# The tolerance of the scores: the same gradients summed in another order (other matrix shapes); relative to the
# largest score of the layer's block (heads or channels), as float32 rounding of sums of products is.
RTOL = 1e-5


def level_masks(structure, seed: int = 0) -> Masks:
    """Random unit masks (whole KV groups in group mode) with the edge cases: no heads in layer 1, no channels in
    layer 2, an unpruned layer 0 of channels."""
    g = torch.Generator().manual_seed(seed)
    units = Masks(torch.rand(structure.n_layers, structure.n_units, generator=g) < 0.6,
                  torch.rand(structure.n_layers, structure.ffn, generator=g) < 0.5)
    units.heads[0, 0] = units.heads[0, -1] = True
    units.heads[1] = False
    units.channels[2] = False
    units.channels[0] = True
    return expand_units(units, structure)


def gradients(model, x) -> None:
    """The objective's gradient of the scored weights (perplexity: mean per-sequence loss), as a pass makes it."""
    losses = batch_losses(model, {"input_ids": x, "attention_mask": torch.ones_like(x)})
    losses.mean().backward()


@pytest.mark.parametrize("gqa_mode", ["query", "group"])
@pytest.mark.parametrize("stem", FAMILIES)
def test_compact_scores_equal_the_masked_models(stem, gqa_mode):
    model = dense(stem).eval()
    structure = describe(model, gqa_mode=gqa_mode)
    layers = layer_modules(model, family_spec(model.config.model_type))
    masks = level_masks(structure)
    x = ids(3, 20)

    applier = MaskApplier(layers, structure)
    applier.set(masks)
    gradients(model, x)
    masked = structure_scores(layers, structure, "reference")
    applier.remove()

    compact = scoring_model(model, masks, structure)
    gradients(compact, x)
    scores = compact_structure_scores(compact, masks, structure, "reference", lambda p: p.grad)
    for got, want in zip(scores, masked):
        finite = want.isfinite()
        assert torch.equal(finite, got.isfinite())  # protected layers: +inf in both
        scale = want[finite].abs().max()
        torch.testing.assert_close(got[finite], want[finite], rtol=RTOL, atol=RTOL * float(scale))
    # the compact model's frozen weights got no gradient; the dense model's were not touched by its pass
    assert all(p.grad is None for n, p in compact.named_parameters() if not p.requires_grad)


def test_a_dense_level_scores_on_the_dense_model():
    """The first step (dense masks) is the dense model's own pass: no compact model is built."""
    from gisp.lightning.scoring import GradientPass

    model = tiny_model("mistral")
    structure = describe(model)
    module = GradientPass(model, layer_modules(model, family_spec("mistral")), structure, n_samples=2, compact=True)
    assert module.score_on(Masks.dense(structure)) is False and module.model is model
    masks = level_masks(structure)
    assert module.score_on(masks) is True and module.model is not model
    assert module.level.equal(masks)
    sliced = sum(p.numel() for p in module.model.parameters())
    assert sliced < sum(p.numel() for p in model.parameters())
    assert GradientPass(model, module.layers, structure, 2, compact=False).score_on(masks) is False


@pytest.mark.parametrize("model, gqa_mode", [("tiny_mistral", "query"), ("tiny_mistral", "group"),
                                             ("tiny_qwen2", "query")])
def test_a_compact_trajectory_has_the_masked_trajectorys_masks(compose_cfg, tmp_path, model, gqa_mode):
    """End to end (the smoke recipe's ten steps): prune.compact=true (the default) and false give the same masks
    at every step and one trajectory id (the setting changes where a pass runs, not its result); the steps after
    the first ran on smaller models."""
    base = [*SMOKE, f"model={model}", "eval=none", "sparsity=0.5", f"prune.gqa_mode={gqa_mode}"]
    compact = run(load_settings(compose_cfg(*base)), run_dir=tmp_path / "compact")
    masked = run(load_settings(compose_cfg(*base, "prune.compact=false", f"store_dir={tmp_path / 'masked_store'}")),
                 run_dir=tmp_path / "masked")
    assert compact["trajectory"]["id"] == masked["trajectory"]["id"]
    a, b = RunDir(tmp_path / "compact").trajectory, RunDir(tmp_path / "masked").trajectory
    assert [s["step"] for s in a.steps] == [s["step"] for s in b.steps] and len(a.steps) >= 5
    assert [s["compact"] for s in a.steps] == [False] + [True] * (len(a.steps) - 1)
    assert not any(s["compact"] for s in b.steps)
    for step in a.steps:
        assert a.masks_at(step["step"]).equal(b.masks_at(step["step"])), step["step"]
        assert step["calib_loss"] == pytest.approx(b.steps[step["step"] - 1]["calib_loss"], rel=1e-5)


def test_a_compact_model_checkpoints_its_layers_exactly():
    """prune.checkpointing on a compact pass: the compact model recomputes its layers in backward through
    transformers' switch (fewer saved bytes) and gives the same gradients."""
    model = tiny_model("llama")
    structure = describe(model)
    masks = level_masks(structure)
    x = ids(2, 32)

    def run(checkpointing: bool):
        compact = scoring_model(model, masks, structure)
        checkpoint_layers(compact, "model.layers", checkpointing)
        loss = []
        with training_layers(compact, "model.layers", checkpointing):
            saved = saved_tensor_bytes(compact, lambda: loss.append(compact(x).logits.float().square().mean()))
            loss[0].backward()
        checkpoint_layers(compact, "model.layers", False)
        return saved, [p.grad for p in compact_scored_weights(compact, structure)]

    (plain, grads), (checkpointed, same) = run(False), run(True)
    assert checkpointed < plain / 2
    assert all(torch.equal(a, b) for a, b in zip(grads, same))


def test_half_precision_compact_and_masked_are_two_trajectories(compose_cfg):
    """In bfloat16 / float16 the compact pass rounds its sums otherwise and the masks can part at a near-tie, so
    prune.compact is part of the trajectory's definition there; in float32 it is not (the masks are equal)."""
    def definition(*overrides):
        return load_settings(compose_cfg(*SMOKE, "model=tiny_mistral", *overrides)).definition("calibration")

    assert definition() == definition("prune.compact=false")
    for dtype in ("bfloat16", "float16"):
        compact, masked = definition(f"model.dtype={dtype}"), definition(f"model.dtype={dtype}", "prune.compact=false")
        assert compact != masked and compact["prune"]["compact"] is True and "compact" not in masked["prune"]
    # a method without a trajectory of gradient steps has nothing to score compact: one trajectory
    assert definition("model.dtype=bfloat16", "pruner=wanda_sp") == \
        definition("model.dtype=bfloat16", "pruner=wanda_sp", "prune.compact=false")


def test_offloaded_host_buffers_are_reused_by_compact_passes():
    """prune.grad_offload=cpu: a compact pass accumulates into the front of its dense weight's host buffer (one per
    layer and role), so the compact steps allocate no new (pinned, on a GPU) host memory, and its scores equal the
    compact pass's without offload."""
    import lightning as L

    from gisp.data.calibration import from_windows
    from gisp.lightning.datamodule import CalibrationData
    from gisp.lightning.scoring import GradientPass
    from gisp.prune.objectives import OBJECTIVES

    x = ids(4, 20)
    masks = None
    scores = {}
    for offload in (None, "cpu"):
        model = tiny_model("mistral")
        structure = describe(model)
        masks = masks or level_masks(structure)
        module = GradientPass(model, layer_modules(model, family_spec("mistral")), structure, n_samples=4,
                              grad_offload=offload, compact=True)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, inference_mode=False, use_distributed_sampler=False)
        data = CalibrationData(from_windows(x, OBJECTIVES["ppl"]), 2)
        trainer.validate(module, datamodule=data, verbose=False)  # the dense pass
        pool = {k: v.data_ptr() for k, v in module._host_pool.items()}
        assert module.score_on(masks)
        trainer.validate(module, datamodule=data, verbose=False)  # the compact pass
        scores[offload] = module.scores
        if offload:
            assert pool and {k: v.data_ptr() for k, v in module._host_pool.items()} == pool
            assert all(buf._base is not None for buf in module._accumulated.values())  # views of the pool
    for got, want in zip(scores["cpu"], scores[None]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
