"""SlimGPT (Ling et al., arXiv 2412.18110) in gisp's harness: structured OBS, layer by layer.

For each unprotected decoder layer, from the first, with the inputs the already pruned layers produce:
1. the Hessian of o_proj's inputs (the heads' outputs) over the calibration tokens; heads (query heads, or KV
   groups with prune.gqa_mode=group) removed one at a time, each the one of least OBS error, the remaining
   columns of o_proj updated after every removal (gisp.reconstruct.obs);
2. with the attention pruned, the Hessian of down_proj's inputs; MLP channels removed in SlimGPT's shrinking groups
   by their OBS error, the remaining columns of down_proj updated.
Layer i removes the same fraction r_i of its heads and of its channels, increasing with depth as SlimGPT's
incremental pruning ratio: r_i = r_min + (r_max - r_min) ln(1 + i) / ln(n) over the n unprotected layers, with
r_min = r_max x `min_ratio_fraction` (the release's 20% recipe: 0.0625 / 0.25), r_max solved so that the decoder
lands on the target parameter sparsity (within one channel per layer).

A level is masks + the new kept columns of o_proj and down_proj: the same artefact as a reconstruction, exported and
recovered the same way. Levels are NOT nested (each target prunes and updates from the dense weights): every target
is its own computation, stored as a separate level of the trajectory.

Differences from the release, on purpose: the calibration set is the harness's (the same for every method); a head's
error is the exact block OBS error trace(W_S Hinv_SS^-1 W_S^T) and the inverse Hessian is downdated by its Schur
complement, where the release approximates both with a grouped Cholesky factorization; GQA heads are pruned as query
heads (k / v rows removed only when a group is empty) or as whole groups (prune.gqa_mode=group), where the release has
no GQA handling; gisp's protected layers are never pruned.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from gisp.errors import GispError
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.masks import MaskApplier, Masks
from gisp.reconstruct.layerwise import Batch, capture, layer_output, real_tokens, recording
from gisp.reconstruct.obs import inverse_hessian, prune_columns, prune_groups

log = logging.getLogger(__name__)


def layer_ratios(n: int, r_max: float, min_fraction: float) -> list[float]:
    """SlimGPT's incremental per-layer ratios over n layers (log-increasing from r_max x min_fraction to r_max)."""
    if n == 1:
        return [r_max]
    r_min = r_max * min_fraction
    return [r_min + (r_max - r_min) * math.log(1 + i) / math.log(n) for i in range(n)]


def level_counts(structure: ModelStructure, target: float, min_fraction: float) -> dict[int, tuple[int, int]]:
    """{layer: (head units, channels) to remove} landing on `target` parameter sparsity: r_max solved by bisection,
    then the channels adjusted one at a time (deepest layers first) to within one channel of the target."""
    layers = list(structure.unprotected)
    if not layers or target <= 0:
        return {}
    if target >= structure.max_sparsity:
        raise GispError(f"sparsity {target} is beyond what the unprotected layers hold ({structure.max_sparsity:.4f})")
    units, ffn = structure.n_units, structure.ffn

    def counts(r_max: float) -> dict[int, tuple[int, int]]:
        ratios = layer_ratios(len(layers), r_max, min_fraction)
        return {i: (round(min(r, 1.0) * units), round(min(r, 1.0) * ffn)) for i, r in zip(layers, ratios)}

    def params(c: dict[int, tuple[int, int]]) -> int:
        return sum(h * structure.head_params + f * structure.channel_params for h, f in c.values())

    goal = target * structure.decoder_params
    lo, hi = 0.0, 1.0 / max(min_fraction, 1e-6)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(counts(mid)) < goal else (lo, mid)
    out = counts(hi)
    order = sorted(out, reverse=True)  # adjust the deepest layers first: they prune the most
    for _ in range(len(order) * ffn):
        deficit = goal - params(out)
        if abs(deficit) <= structure.channel_params / 2:
            break
        step = 1 if deficit > 0 else -1
        for i in order:
            h, f = out[i]
            if 0 <= f + step <= ffn:
                out[i] = (h, f + step)
                break
        else:
            break
    return out


def _hessian(layer: nn.Module, i: int, linear: nn.Linear, stream: list[torch.Tensor], batches: list[Batch]
             ) -> tuple[torch.Tensor, int]:
    """Sum x x^T of `linear`'s inputs over the real tokens, running layer `i` on the pruned stream (float32)."""
    gram, count = None, 0
    inputs: list[torch.Tensor] = []
    with torch.no_grad(), recording(linear, "in", inputs):
        for b, batch in enumerate(batches):
            layer(stream[b], *batch.args[i][0], **batch.args[i][1])
            x = real_tokens(inputs.pop(), batch.tokens).float()
            gram = x.t() @ x if gram is None else gram.addmm_(x.t(), x)
            count += x.shape[0]
    return gram, count


def slimgpt_level(model: nn.Module, decoder: nn.ModuleList, layers: list[LayerModules], structure: ModelStructure,
                  batches: list[dict], target: float, percdamp: float = 0.01, min_fraction: float = 0.25
                  ) -> tuple[Masks, dict[str, torch.Tensor]]:
    """SlimGPT's level at `target`: its masks and the new kept columns of o_proj ("attn.{i}") and down_proj
    ("mlp.{i}", float32). The model's weights are unchanged afterwards."""
    counts = level_counts(structure, target, min_fraction)
    masks = Masks.dense(structure)
    applier = MaskApplier(layers, structure)
    saved = {i: (layers[i].o.weight.detach().clone(), layers[i].down.weight.detach().clone()) for i in counts}
    weights: dict[str, torch.Tensor] = {}
    d_h, g = structure.head_dim, structure.group_size
    # a unit's o_proj columns: its g query heads' d_h columns each
    unit_columns = torch.arange(structure.n_heads * d_h).reshape(structure.n_units, g * d_h)
    try:
        firsts, calls = capture(model, decoder, batches)
        stream = [h.clone() for h in firsts]
        for i, layer in enumerate(decoder):
            n_heads, n_channels = counts.get(i, (0, 0))
            m = layers[i]
            if n_heads:
                gram, count = _hessian(layer, i, m.o, stream, calls)
                w = m.o.weight.detach().double()
                removed = prune_groups(w, inverse_hessian(gram, count, percdamp), unit_columns, n_heads)
                for u in removed:
                    masks.heads[i, u * g:(u + 1) * g] = False
                with torch.no_grad():
                    m.o.weight.copy_(w.to(m.o.weight.dtype))
                applier.set(masks)
                kept = masks.heads[i].repeat_interleave(d_h).to(w.device)
                weights[f"attn.{i}"] = w[:, kept].float().cpu()
            if n_channels:
                gram, count = _hessian(layer, i, m.down, stream, calls)
                w = m.down.weight.detach().double()
                removed = prune_columns(w, inverse_hessian(gram, count, percdamp), n_channels)
                masks.channels[i, removed] = False
                with torch.no_grad():
                    m.down.weight.copy_(w.to(m.down.weight.dtype))
                applier.set(masks)
                weights[f"mlp.{i}"] = w[:, masks.channels[i].to(w.device)].float().cpu()
            with torch.no_grad():
                for b, batch in enumerate(calls):
                    stream[b] = layer_output(layer(stream[b], *batch.args[i][0], **batch.args[i][1]))
            if n_heads or n_channels:
                log.debug("slimgpt layer %d: %d head units, %d channels removed", i, n_heads, n_channels)
    finally:
        applier.remove()
        with torch.no_grad():
            for i, (o, down) in saved.items():
                layers[i].o.weight.copy_(o)
                layers[i].down.weight.copy_(down)
    weights = {k: v for k, v in weights.items() if v.shape[1]}
    return masks, weights
