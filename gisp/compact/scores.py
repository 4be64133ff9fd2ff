"""GISP's scores computed on a level's compact model, in the dense model's indexing (`prune.compact=true`).

A gradient pass on the masked dense model and one on the compact model of the same masks compute the same function
of the kept weights: pruned heads and channels contribute nothing in either (the masked model zeroes their o_proj /
down_proj inputs, the compact model has no such rows and columns). So the mean gradient of every kept weight is the
same up to float rounding (other matrix shapes sum in another order), and so is each kept structure's |W * g| sum.
Pruned structures score 0 in the masked model (their gradients are exactly zero; with OLMo 2's projection-wide
q / k norm the compact model keeps every head's q / k rows, as the masked model does, and they score the same);
here they get those same values, so the block-wise normalization (its shift included) and the global ranking see
the same numbers, and the masks of the next step are the same (tests/models/test_compact_scoring.py).
"""

from __future__ import annotations

import torch
from torch import nn

from gisp.compact.modeling_gisp import GispDecoderForCausalLM
from gisp.compact.slicing import compact_model, kv_plan
from gisp.models.structure import ModelStructure
from gisp.prune.importance import GradOf, normalize, taylor_sums
from gisp.prune.masks import Masks


def scoring_model(dense: nn.Module, masks: Masks, structure: ModelStructure) -> GispDecoderForCausalLM:
    """The compact model of `masks` for a gradient pass: sliced from the dense weights (embeddings and norms shared
    with them), every weight frozen except the scored ones (`compact_scored_weights`)."""
    compact = compact_model(dense, masks, structure)
    compact.requires_grad_(False)
    for p in compact_scored_weights(compact, structure):
        p.requires_grad_(True)
    return compact


def _blocks(compact: GispDecoderForCausalLM) -> nn.ModuleList:
    return compact.model.layers


def compact_scored_weights(compact: GispDecoderForCausalLM, structure: ModelStructure) -> list[nn.Parameter]:
    """The weights whose gradients GISP's score needs, as `gisp.prune.importance.scored_weights` picks them in the
    dense model: q, o, (gate), up, down, and k, v when a unit owns them, of the unprotected layers that still have
    them (a layer whose heads or channels are all pruned has no attention or MLP block)."""
    weights = []
    for i in structure.unprotected:
        block = _blocks(compact)[i]
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if attn is not None:
            weights += [attn.q_proj.weight, attn.o_proj.weight]
            if structure.kv_in_unit:
                weights += [attn.k_proj.weight, attn.v_proj.weight]
        if mlp is not None:
            projections = (getattr(mlp, "gate_proj", None), mlp.up_proj, mlp.down_proj)  # no gate: a plain MLP
            weights += [m.weight for m in projections if m is not None]
    return weights


ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # LayerModules field -> compact path


def weight_roles(compact: GispDecoderForCausalLM, structure: ModelStructure) -> dict[int, tuple[int, str]]:
    """id(weight) -> (layer, role) of the compact model's projections, roles named as gisp.models.structure's
    LayerModules fields: the same key as the dense weight it was sliced from."""
    out = {}
    for i, block in enumerate(_blocks(compact)):
        for role, path in ROLES.items():
            owner, name = path.split(".")
            module = getattr(getattr(block, owner, None), name, None)
            if module is not None:
                out[id(module.weight)] = (i, role)
    return out


def _per_head(weight: torch.Tensor, grad_of: GradOf, dim: int, head_dim: int) -> torch.Tensor:
    """Sums of |W * g| per head of a q / k / v (rows, dim=1) or o (columns, dim=0) weight: (heads,)."""
    return taylor_sums(weight, grad_of(weight), dim).view(-1, head_dim).sum(dim=1)


def compact_layer_scores(block: nn.Module, kept_heads: torch.Tensor, kept_channels: torch.Tensor,
                         structure: ModelStructure, grad_of: GradOf) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw per-unit (n_units,) and per-channel (F,) sums of |W * g| of one compact layer, at the dense indices of its
    kept query heads / KV heads / channels (0 elsewhere, what a pruned structure scores in the masked model)."""
    H, K, d_h, F = structure.n_heads, structure.n_kv_heads, structure.head_dim, structure.ffn
    kept_q = kept_heads.nonzero().flatten().tolist()
    kept_kv, _ = kv_plan(kept_q, structure)
    per_q = torch.zeros(H, dtype=torch.float32)
    per_kv = torch.zeros(K if structure.gqa else H, dtype=torch.float32)
    attn = getattr(block, "self_attn", None)
    if attn is not None:
        all_rows = attn.statistic  # OLMo 2: q_proj / k_proj keep every head's rows (their norm's statistic)
        per_q[list(range(H)) if all_rows else kept_q] += _per_head(attn.q_proj.weight, grad_of, 1, d_h).cpu()
        per_q[kept_q] += _per_head(attn.o_proj.weight, grad_of, 0, d_h).cpu()
        if structure.kv_in_unit:
            per_kv[list(range(per_kv.numel())) if all_rows else kept_kv] += \
                _per_head(attn.k_proj.weight, grad_of, 1, d_h).cpu()
            per_kv[kept_kv] += _per_head(attn.v_proj.weight, grad_of, 1, d_h).cpu()
    heads = per_q.view(structure.n_units, structure.group_size).sum(dim=1)
    if structure.kv_in_unit:
        heads += per_kv
    channels = torch.zeros(F, dtype=torch.float32)
    mlp = getattr(block, "mlp", None)
    if mlp is not None:
        rows = [m for m in (getattr(mlp, "gate_proj", None), mlp.up_proj) if m is not None]
        sums = sum(taylor_sums(m.weight, grad_of(m.weight), dim=1) for m in rows)
        sums = sums + taylor_sums(mlp.down_proj.weight, grad_of(mlp.down_proj.weight), dim=0)
        channels[kept_channels.nonzero().flatten()] = sums.cpu()
    return heads, channels


def compact_structure_scores(compact: GispDecoderForCausalLM, masks: Masks, structure: ModelStructure,
                             normalization: str, grad_of: GradOf) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized scores (L, n_units) and (L, F) in the dense indexing from the mean gradients of the compact model's
    scored weights; protected layers +inf (as `gisp.prune.importance.structure_scores`)."""
    L = structure.n_layers
    heads = torch.full((L, structure.n_units), float("inf"))
    channels = torch.full((L, structure.ffn), float("inf"))
    for i in structure.unprotected:
        heads[i], channels[i] = compact_layer_scores(_blocks(compact)[i], masks.heads[i], masks.channels[i],
                                                     structure, grad_of)
    return normalize(heads, channels, structure, normalization)
