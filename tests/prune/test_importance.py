"""Scores equal a slow, obvious reference; the batched mean gradient equals the full-batch gradient."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import tiny_model

from gisp.data.calibration import from_windows
from gisp.lightning.datamodule import CalibrationData
from gisp.lightning.scoring import GradientPass
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.prune.importance import normalize, structure_scores
from gisp.prune.objectives import OBJECTIVES, sequence_nll


def full_batch_grads(model, ids):
    """Gradient of the mean per-sequence loss over ALL sequences in one batch (the definition of g_bar)."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    sequence_nll(model, ids).mean().backward()


def slow_scores(model, structure):
    """Loops over layers, heads and channels; per-weight |w * g| summed element by element of each structure."""
    layers = layer_modules(model, family_spec(model.config.model_type))
    d_h = structure.head_dim
    heads = torch.full((structure.n_layers, structure.n_heads), float("inf"))
    channels = torch.full((structure.n_layers, structure.ffn), float("inf"))
    for i in structure.unprotected:
        m = layers[i]
        taylor = {name: (w.weight * w.weight.grad).abs() for name, w in vars(m).items()}
        for h in range(structure.n_heads):
            rows = slice(h * d_h, (h + 1) * d_h)
            s = taylor["q"][rows, :].sum() + taylor["o"][:, rows].sum()
            if not structure.gqa:
                s = s + taylor["k"][rows, :].sum() + taylor["v"][rows, :].sum()
            heads[i, h] = s
        for j in range(structure.ffn):
            channels[i, j] = taylor["gate"][j, :].sum() + taylor["up"][j, :].sum() + taylor["down"][:, j].sum()
    return heads, channels


def test_scores_equal_slow_reference(family):
    model = tiny_model(family)
    structure = describe(model)
    ids = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(1))
    full_batch_grads(model, ids)
    layers = layer_modules(model, family_spec(model.config.model_type))
    heads, channels = structure_scores(layers, structure, normalization="none")
    ref_h, ref_c = slow_scores(model, structure)
    torch.testing.assert_close(heads, ref_h, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(channels, ref_c, rtol=1e-5, atol=1e-9)
    assert structure.protected == (3,) and torch.isinf(heads[3]).all() and torch.isinf(channels[3]).all()


def test_normalizations_follow_method():
    model = tiny_model("mistral")
    structure = describe(model)
    d_h, d, F = structure.head_dim, structure.hidden, structure.ffn
    heads = torch.rand(4, 4).index_fill(0, torch.tensor([3]), float("inf"))
    channels = torch.rand(4, 128).index_fill(0, torch.tensor([3]), float("inf"))
    ph, pc = normalize(heads, channels, structure, "paper")
    torch.testing.assert_close(ph[:3], heads[:3] / (4 * d_h * d))
    torch.testing.assert_close(pc[:3], channels[:3] / (3 * d))
    rh, rc = normalize(heads, channels, structure, "reference")
    shift = min((heads[:3] / (4 * d_h * d)).min(), (channels[:3] / (3 * F)).min())
    torch.testing.assert_close(rh[:3], heads[:3] / (4 * d_h * d) + shift)
    torch.testing.assert_close(rc[:3], channels[:3] / (3 * F) + shift)
    assert torch.isinf(rh[3]).all()


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_lightning_pass_mean_gradient_equals_full_batch(family, batch_size):
    """Scores from the Lightning validation loop (batched, accumulated) equal the full-batch gradient's scores."""
    ids = torch.randint(0, 300, (6, 20), generator=torch.Generator().manual_seed(2))
    reference_model = tiny_model(family)
    structure = describe(reference_model)
    full_batch_grads(reference_model, ids)
    ref = structure_scores(layer_modules(reference_model, family_spec(family)), structure, "reference")

    model = tiny_model(family)
    layers = layer_modules(model, family_spec(family))
    module = GradientPass(model, layers, structure, n_samples=6)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, use_distributed_sampler=False)
    calib = from_windows(ids, OBJECTIVES["ppl"])
    trainer.validate(module, datamodule=CalibrationData(calib, batch_size), verbose=False)
    torch.testing.assert_close(module.scores[0], ref[0], rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(module.scores[1], ref[1], rtol=1e-4, atol=1e-10)
    full_loss = float(sequence_nll(reference_model, ids).mean().detach())
    assert module.calib_loss == pytest.approx(full_loss, rel=1e-5)
    # Only scored weights of unprotected layers take gradients; gradients are freed after scoring.
    assert not model.model.embed_tokens.weight.requires_grad and not layers[3].q.weight.requires_grad
    assert layers[0].k.weight.requires_grad == (family == "llama")
    assert all(p.grad is None for p in model.parameters())


def test_float32_accumulation_for_a_bf16_model():
    """prune.grad_dtype=float32: the mean gradient of a bf16 model is summed in float32, batch by batch."""
    ids = torch.randint(0, 300, (6, 16), generator=torch.Generator().manual_seed(3))
    oracle = tiny_model("mistral").to(torch.bfloat16)
    structure = describe(oracle)
    oracle_layers = layer_modules(oracle, family_spec("mistral"))
    sums = {}
    for row in ids:  # batch size 1: each sample's bf16 gradient, summed in float32
        oracle.zero_grad(set_to_none=True)
        for p in oracle.parameters():
            p.requires_grad_(True)
        (sequence_nll(oracle, row[None]).sum() / 6).backward()
        for p in oracle.parameters():
            if p.grad is not None:
                sums[id(p)] = sums.get(id(p), 0) + p.grad.float()
    ref = structure_scores(oracle_layers, structure, "reference", grad_of=lambda w: sums[id(w)])

    model = tiny_model("mistral").to(torch.bfloat16)
    layers = layer_modules(model, family_spec("mistral"))
    module = GradientPass(model, layers, structure, n_samples=6, grad_dtype=torch.float32)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, use_distributed_sampler=False)
    trainer.validate(module, datamodule=CalibrationData(from_windows(ids, OBJECTIVES["ppl"]), 1), verbose=False)
    torch.testing.assert_close(module.scores[0], ref[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(module.scores[1], ref[1], rtol=1e-6, atol=0)
    assert all(p.grad is None for p in model.parameters()) and not module._accumulated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_taylor_sums_in_pieces_leave_the_weights_alone(dtype, monkeypatch):
    """|W * g| is summed in row pieces (float32 copies): the sums equal the whole product's, and the weights are
    never written (for a float32 weight `.float()` is the weight itself)."""
    from gisp.prune import importance

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(37, 29, generator=g).to(dtype)
    grad = torch.randn(37, 29, generator=g).to(dtype)
    before = weight.clone()
    whole = (weight.float() * grad.float()).abs()
    monkeypatch.setattr(importance, "_PIECE", 100)  # 3 rows per piece: 13 pieces, the last one shorter
    torch.testing.assert_close(importance.taylor_sums(weight, grad, 1), whole.sum(dim=1))
    torch.testing.assert_close(importance.taylor_sums(weight, grad, 0), whole.sum(dim=0))
    assert torch.equal(weight, before)
