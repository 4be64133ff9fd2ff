"""Reconstruction on tiny models, against numerical oracles: the ridge solve against torch.linalg.lstsq, the
layer-by-layer refit against a least-squares solution on activations recorded by plain hooks on whole-model forwards,
an exact reproduction where the removed inputs are copies of kept ones, FLAP's formula, the masks left as they were."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from gisp.models.families import family_spec, get_submodule
from gisp.models.structure import describe, layer_modules
from gisp.prune.masks import MaskApplier, Masks, OutputBias
from gisp.prune.methods import flap_bias as flap_formula
from gisp.reconstruct.build import Reconstruction, installed, reconstruct
from gisp.reconstruct.settings import ReconstructSettings
from gisp.reconstruct.solve import GramStats, ridge


def _batches(vocab: int, n: int = 3, b: int = 4, t: int = 24, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (b, t), generator=g)} for _ in range(n)]


def _setup(family: str, seed: int = 0):
    model = tiny_model(family, seed=seed)
    structure = describe(model, protected=())
    layers = layer_modules(model, family_spec(model.config.model_type))
    return model, structure, layers


def test_ridge_equals_lstsq_with_and_without_intercept():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(300, 7, generator=g), torch.randn(300, 5, generator=g)
    stats = GramStats.zeros(7, 5)
    stats.add(z[:150], y[:150])
    stats.add(z[150:], y[150:])
    w, b = ridge(stats, damp=0.0, intercept=False)
    torch.testing.assert_close(w, torch.linalg.lstsq(z.double(), y.double()).solution.t().float(), rtol=1e-5,
                               atol=1e-5)
    assert b is None
    w, b = ridge(stats, damp=0.0, intercept=True)
    ones = torch.cat([z, torch.ones(300, 1)], dim=1).double()
    full = torch.linalg.lstsq(ones, y.double()).solution.t().float()
    torch.testing.assert_close(w, full[:, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, full[:, 7], rtol=1e-5, atol=1e-5)
    lam = 0.3 * float((z.t() @ z).diagonal().mean())  # damping: relative to the mean diagonal
    damped = torch.linalg.solve(z.t().double() @ z.double() + lam * torch.eye(7, dtype=torch.float64),
                                z.t().double() @ y.double()).t().float()
    torch.testing.assert_close(ridge(stats, damp=0.3, intercept=False)[0], damped, rtol=1e-5, atol=1e-5)


def _record(module, kind: str):
    store = []
    if kind == "in":
        return store, module.register_forward_pre_hook(lambda m, a: store.append(a[0].detach().clone()))
    return store, module.register_forward_hook(lambda m, a, o: store.append(o.detach().clone()))


@pytest.mark.parametrize(("family", "target"), [("llama", "dense"), ("mistral", "dense"), ("llama", "local"),
                                               ("mistral", "local")])
def test_layerwise_refit_equals_least_squares_on_recorded_activations(family, target):
    """One pruned layer (the others dense, so the pruned stream is the dense one up to it): o_proj's refit is the
    least-squares map from the masked o_proj inputs to the dense o_proj outputs, and down_proj's the map from the
    down_proj inputs with the new o_proj in place to the down_proj outputs of the dense model (target=dense) or of the
    unpruned MLP fed by the reconstructed attention (target=local), recorded by hooks on whole-model forwards (no
    layer-by-layer machinery)."""
    model, structure, layers = _setup(family)
    masks = Masks.dense(structure)
    masks.heads[2, 1] = False
    masks.channels[2, ::3] = False
    batches = _batches(model.config.vocab_size)
    rec = reconstruct(model, layers, structure, masks, batches,
                      ReconstructSettings(method="lsq", damp=0.0, target=target))
    assert sorted(rec.weights) == ["attn.2", "mlp.2"] and rec.bias is None

    def tokens(x):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in x])

    applier = MaskApplier(layers, structure)
    with torch.no_grad():
        dense_o, h1 = _record(layers[2].o, "out")
        dense_d, h2 = _record(layers[2].down, "out")
        for batch in batches:
            model(**batch)
        h1.remove(), h2.remove()
        applier.set(masks)
        z, h = _record(layers[2].o, "in")
        for batch in batches:
            model(**batch)
        h.remove()
    kept = masks.heads[2].repeat_interleave(structure.head_dim)
    oracle_o = torch.linalg.lstsq(tokens(z)[:, kept].double(), tokens(dense_o).double()).solution.t().float()
    torch.testing.assert_close(rec.weights["attn.2"], oracle_o, rtol=2e-3, atol=2e-4)
    attention_only = masks.clone()
    attention_only.channels[:] = True
    with torch.no_grad():
        with installed(layers, structure, masks, Reconstruction({"attn.2": rec.weights["attn.2"]})):
            u, h = _record(layers[2].down, "in")
            for batch in batches:
                model(**batch)
            h.remove()
        if target == "local":
            applier.set(attention_only)
            with installed(layers, structure, attention_only, Reconstruction({"attn.2": rec.weights["attn.2"]})):
                dense_d, h = _record(layers[2].down, "out")
                for batch in batches:
                    model(**batch)
                h.remove()
    applier.remove()
    kept_ch = masks.channels[2]
    oracle_d = torch.linalg.lstsq(tokens(u)[:, kept_ch].double(), tokens(dense_d).double()).solution.t().float()
    torch.testing.assert_close(rec.weights["mlp.2"], oracle_d, rtol=2e-3, atol=2e-4)


def test_removed_copies_of_kept_inputs_are_reproduced_exactly():
    """Head 1 a copy of head 0 (its q, k, v rows) and channel 5 a copy of channel 4 (gate and up rows) in every
    layer: removing the copies loses nothing a refit cannot put back, and the undamped reconstruction gives the
    dense model's logits (up to float rounding), while the plain masked model does not."""
    model, structure, layers = _setup("llama")  # no GQA: each head has its own k and v rows
    d_h = structure.head_dim
    with torch.no_grad():
        for m in layers:
            for lin in (m.q, m.k, m.v):
                lin.weight[d_h:2 * d_h] = lin.weight[:d_h]
            for lin in (m.gate, m.up):
                lin.weight[5] = lin.weight[4]
    masks = Masks.dense(structure)
    masks.heads[:, 1] = False
    masks.channels[:, 5] = False
    batches = _batches(model.config.vocab_size, n=4)
    ids = torch.randint(3, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        dense = model(ids).logits
    rec = reconstruct(model, layers, structure, masks, batches, ReconstructSettings(method="lsq", damp=0.0))
    applier = MaskApplier(layers, structure)
    with torch.no_grad():
        applier.set(masks)
        masked = model(ids).logits
        with installed(layers, structure, masks, rec):
            reconstructed = model(ids).logits
    applier.remove()
    assert (masked - dense).abs().max() > 1e-2
    torch.testing.assert_close(reconstructed, dense, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense)  # the dense weights are back


def test_bias_is_flaps_formula_and_masks_stay():
    model, structure, layers = _setup("mistral")
    masks = Masks.dense(structure)
    masks.heads[1, 2] = False
    masks.channels[3, :40] = False
    before = masks.clone()
    batches = _batches(model.config.vocab_size)
    rec = reconstruct(model, layers, structure, masks, batches, ReconstructSettings(method="bias"))
    assert masks.equal(before) and not rec.weights
    from gisp.prune.activations import InputRecorder

    recorder = InputRecorder(layers, structure)
    with recorder, torch.no_grad():
        for batch in batches:
            model(**batch)
    expected = flap_formula(layers, structure, masks, recorder.moments)
    torch.testing.assert_close(rec.bias.attn, expected.attn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.bias.mlp, expected.mlp, rtol=1e-5, atol=1e-6)
    assert isinstance(rec.bias, OutputBias)


def test_a_reconstruction_round_trips_through_its_file(tmp_path):
    model, structure, layers = _setup("llama")
    masks = Masks.dense(structure)
    masks.channels[1, :10] = False
    rec = reconstruct(model, layers, structure, masks, _batches(model.config.vocab_size),
                      ReconstructSettings(method="lsq", intercept=True))
    rec.save(tmp_path / "level.safetensors")
    back = Reconstruction.load(tmp_path / "level.safetensors")
    assert back.weights.keys() == rec.weights.keys()
    assert all(torch.equal(back.weights[k], rec.weights[k].float()) for k in rec.weights)
    torch.testing.assert_close(back.bias.mlp, rec.bias.mlp)
    decoder = get_submodule(model, family_spec("llama").layers)
    assert len(decoder) == structure.n_layers
