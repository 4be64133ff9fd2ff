"""Masks applied by hooks act exactly like zeroing the structures' weights, and are fully reversible."""

from __future__ import annotations

import torch
from conftest import tiny_model

from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.prune.masks import MaskApplier, Masks, sparsity


def random_masks(structure, seed=0, keep=0.6):
    g = torch.Generator().manual_seed(seed)
    m = Masks(torch.rand(structure.n_layers, structure.n_heads, generator=g) < keep,
              torch.rand(structure.n_layers, structure.ffn, generator=g) < keep)
    m.heads[0, 0] = False
    return m


@torch.no_grad()
def zero_weights(model, masks, structure):
    """The reference's way: zero q rows (and k/v rows without GQA) and o columns of heads; gate/up rows, down cols."""
    d_h = structure.head_dim
    for i, m in enumerate(layer_modules(model, family_spec(model.config.model_type))):
        head_rows = (~masks.heads[i]).repeat_interleave(d_h)
        m.q.weight[head_rows] = 0
        m.o.weight[:, head_rows] = 0
        if not structure.gqa:
            m.k.weight[head_rows] = 0
            m.v.weight[head_rows] = 0
        ch = ~masks.channels[i]
        m.gate.weight[ch] = 0
        m.up.weight[ch] = 0
        m.down.weight[:, ch] = 0


@torch.no_grad()
def test_hook_masks_equal_zeroed_weights_and_are_reversible(family):
    model, oracle = tiny_model(family), tiny_model(family)
    structure = describe(model)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    dense_logits = model(ids).logits
    masks = random_masks(structure)
    applier = MaskApplier(layer_modules(model, family_spec(family)), structure)
    applier.set(masks)
    zero_weights(oracle, masks, structure)
    torch.testing.assert_close(model(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)
    applier.set(Masks.dense(structure))
    torch.testing.assert_close(model(ids).logits, dense_logits, rtol=0, atol=0)
    applier.set(masks)
    applier.remove()
    torch.testing.assert_close(model(ids).logits, dense_logits, rtol=0, atol=0)


def test_masks_file_roundtrip_and_names(tmp_path):
    structure = describe(tiny_model("mistral"))
    masks = random_masks(structure)
    masks.save(tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "m.safetensors"))
    assert set(raw) == {f"layers.{i}.{k}" for i in range(4) for k in ("heads", "channels")}
    assert raw["layers.0.heads"].dtype == torch.bool
    back = Masks.load(tmp_path / "m.safetensors")
    assert back.heads.equal(masks.heads) and back.channels.equal(masks.channels)
    assert not list(tmp_path.glob("*.tmp"))


def test_sparsity_accounting(family):
    model = tiny_model(family)
    s = describe(model)
    total = sum(p.numel() for p in model.model.layers.parameters())
    assert s.decoder_params == total
    assert s.head_params == (4 if not s.gqa else 2) * s.head_dim * s.hidden
    assert s.channel_params == 3 * s.hidden
    m = Masks.dense(s)
    m.heads[1, :2] = False
    m.channels[2, :5] = False
    assert sparsity(m, s) == (2 * s.head_params + 5 * s.channel_params) / total
