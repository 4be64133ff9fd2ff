"""Rankings as pure cuts: which heads and channels a step or a level prunes, given the scores.

`global`: one ranking of every head and channel of every unprotected layer (GISP, FLAP). `local`: the baselines'
uniform rule, each unprotected layer prunes the same number of heads and of channels. A cut is separate from
applying it (masks.MaskApplier) so it can be tested, logged and replayed.

Scores are per head UNIT (L, n_units): a query head in `gqa_mode=query`, a whole KV group in `gqa_mode=group`;
cuts rank units and return query-head masks (L, H) in which a group is always kept or pruned whole.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gisp.errors import GispError
from gisp.models.structure import ModelStructure
from gisp.prune.masks import Masks, expand_units, group_heads, masks_from_flat, n_pruned, sparsity, unit_masks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cut:
    """What a ranking rule prunes: the masks, their parameter sparsity and the target they landed on."""

    masks: Masks
    sparsity: float
    landed_target: float | None  # the sparsity target this step was capped at, if any


def _current_units(current: Masks, n_units: int) -> Masks:
    """`current` (query-head masks) per unit when the scores are per KV group (their shape says which)."""
    n_heads = current.heads.shape[1]
    if n_units <= 0 or n_heads % n_units:
        raise GispError(f"head scores for {n_units} units do not fit masks of {n_heads} heads")
    return group_heads(current, n_heads // n_units)


def _check_scores(heads: torch.Tensor, channels: torch.Tensor, structure: ModelStructure) -> None:
    expected = ((structure.n_layers, structure.n_units), (structure.n_layers, structure.ffn))
    if (tuple(heads.shape), tuple(channels.shape)) != expected:
        raise GispError(f"scores of shapes {tuple(heads.shape)} / {tuple(channels.shape)} do not fit this model "
                        f"({structure.gqa_mode} mode: heads {expected[0]}, channels {expected[1]})")


def global_order(heads: torch.Tensor, channels: torch.Tensor, current: Masks) -> torch.Tensor:
    """Indices of all structures (head units of all layers first, then channels) from first to last to prune.

    Already pruned structures go first whatever their score (nested masks are guaranteed, not left to numerics),
    protected ones (+inf) last; ties break by index, so the order is deterministic (stable sort). `current` holds
    query-head masks; with per-group scores (L, n_kv) it is read per group.
    """
    key = torch.cat([heads.flatten(), channels.flatten()]).double()
    key[_current_units(current, heads.shape[1]).flat_pruned()] = float("-inf")
    return torch.sort(key, stable=True).indices


def cut_step(
    heads: torch.Tensor,
    channels: torch.Tensor,
    current: Masks,
    structure: ModelStructure,
    n_prune: int,
    cap: float | None = None,
) -> Cut:
    """Prune the `n_prune` lowest-scored structures overall (never fewer than are already pruned).

    With `cap` (the next sparsity target), a step whose prefix would reach or overshoot the cap is cut to the
    prefix whose measured sparsity is closest to the cap: the step lands on the target to within one structure.
    """
    _check_scores(heads, channels, structure)
    L, U = structure.n_layers, structure.n_units
    order = global_order(heads, channels, current)
    prunable = int(torch.isfinite(torch.cat([heads.flatten(), channels.flatten()])).sum())
    n_current = n_pruned(current, structure)
    n = min(max(n_prune, n_current), prunable)  # protected structures (+inf) are never pruned
    cost = torch.where(order < L * U, structure.head_params, structure.channel_params)
    cum = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(cost, 0)])  # cum[m] = params in first m
    landed = None
    if cap is not None and cum[n] / structure.decoder_params >= cap:
        candidates = cum[n_current : n + 1].double() / structure.decoder_params
        n = n_current + int(torch.argmin((candidates - cap).abs()))
        landed = cap
    flat = torch.zeros(order.numel(), dtype=torch.bool)
    flat[order[:n]] = True
    masks = masks_from_flat(flat, structure)
    return Cut(masks, sparsity(masks, structure), landed)


def cut_global(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure,
                target: float, **_) -> Cut:
    """One global ranking of all heads and channels (protected +inf), pruned by parameters to land on `target`."""
    return cut_step(heads, channels, current, structure, structure.n_structures, cap=target)


def local_counts(structure: ModelStructure, target: float) -> tuple[int, int]:
    """Heads and channels to prune in EVERY unprotected layer so the decoder lands on `target` sparsity: the
    layer ratio r fixes the heads (int(r H), as wanda_sp / LLM-Pruner round), channels fill the rest."""
    return layer_counts(structure, target * structure.decoder_params / len(structure.unprotected), target)


def layer_counts(structure: ModelStructure, budget: float, target: float) -> tuple[int, int]:
    """Heads and channels one unprotected layer prunes to give up `budget` parameters: the layer ratio r fixes the
    heads (int(r H)), channels fill the rest."""
    per_layer = structure.n_units * structure.head_params + structure.ffn * structure.channel_params
    ratio = budget / per_layer
    if ratio >= 1.0:
        raise GispError(f"sparsity {target} needs more than every structure of the unprotected layers")
    n_heads = int(max(ratio, 0.0) * structure.n_units + 1e-9)
    n_channels = round((budget - n_heads * structure.head_params) / structure.channel_params)
    return n_heads, min(max(n_channels, 0), structure.ffn)


def _cut_layers(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure,
                counts: dict[int, tuple[int, int]], target: float) -> Cut:
    """Each unprotected layer i prunes its own counts[i] = (heads, channels) lowest-scored structures; already pruned
    structures go first, so levels cut from one score are nested."""
    _check_scores(heads, channels, structure)
    units = unit_masks(current, structure)
    kept_heads, kept_channels = units.heads.clone(), units.channels.clone()
    for i in structure.unprotected:
        n_heads, n_channels = counts[i]
        for scores, kept, n in ((heads[i], kept_heads[i], n_heads), (channels[i], kept_channels[i], n_channels)):
            key = scores.double().clone()
            key[~kept] = float("-inf")
            n = max(n, int((~kept).sum()))
            kept[torch.sort(key, stable=True).indices[:n]] = False
    masks = expand_units(Masks(kept_heads, kept_channels), structure)
    return Cut(masks, sparsity(masks, structure), target)


def cut_local(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure,
               target: float, **_) -> Cut:
    """The baselines' uniform rule: each unprotected layer prunes its own lowest-scored heads and channels, the
    same number in every layer."""
    counts = local_counts(structure, target)
    return _cut_layers(heads, channels, current, structure, dict.fromkeys(structure.unprotected, counts), target)


def owl_layer_sparsity(outliers: torch.Tensor, structure: ModelStructure, target: float, lam: float
                       ) -> dict[int, float]:
    """OWL's layerwise sparsity (Yin et al. 2023): over the unprotected layers, the outlier ratios D are scaled to
    [0, 2 lambda]; a layer's sparsity is target - (that - its mean), so layers with more outliers keep more, and the
    sparsities average to the target (floored at 0.01 as OWL does)."""
    idx = list(structure.unprotected)
    d = outliers[idx].double()
    span = float(d.max() - d.min())
    scaled = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    layer = target - (scaled - scaled.mean())
    return {i: max(float(s), 0.01) for i, s in zip(idx, layer)}


def check_owl(targets: tuple[float, ...], structure: ModelStructure, lam: float) -> None:
    """OWL's layer sparsities reach target + 2 lambda at most (the layer with the fewest outliers); refuse, before
    any scoring, a lambda that could ask some layer for more than its prunable structures at the largest target."""
    per_layer = structure.decoder_params / len(structure.unprotected)
    prunable = structure.n_units * structure.head_params + structure.ffn * structure.channel_params
    top = max(targets)
    if (top + 2 * lam) * per_layer >= prunable:
        most = max(0.0, (prunable / per_layer - top) / 2)
        raise GispError(f"pruner.options.outlier_lambda={lam} is too large for sparsity {top}: OWL can ask a layer "
                        f"for up to {top} + 2 x {lam} of the layer budget, more than its structures hold; use "
                        f"outlier_lambda below {most:.3f} (OWL's default 0.08), or lower the sparsity")


def cut_owl(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure, target: float,
             stats: dict[str, torch.Tensor] | None = None, pruner=None, **_) -> Cut:
    """OWL on Wanda-sp: layer i gives up its OWL sparsity of the parameters every layer would give up at `target`
    (its heads int(r_i H), channels fill the rest), so the decoder lands on the target (within one channel per
    layer); within a layer the lowest Wanda-sp scores go first."""
    if stats is None or "outlier_ratio" not in stats:
        raise GispError("ranking=owl needs the layers' outlier ratios: use it with pruner.score=owl (pruner=owl)")
    lam = pruner.option("outlier_lambda") if pruner is not None else 0.08
    per_layer = structure.decoder_params / len(structure.unprotected)
    ratios = owl_layer_sparsity(stats["outlier_ratio"], structure, target, lam)
    counts = {i: layer_counts(structure, r * per_layer, target) for i, r in ratios.items()}
    return _cut_layers(heads, channels, current, structure, counts, target)


def cut_layers(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure,
                target: float, stats: dict[str, torch.Tensor] | None = None, **_) -> Cut:
    """ShortGPT: whole unprotected layers (all their heads and channels) in ascending block influence, as many as
    land closest to `target` (within one layer); already removed layers go first, so levels are nested."""
    if stats is None or "block_influence" not in stats:
        raise GispError("ranking=layers needs the layers' block influence: use it with pruner.score=block_influence "
                        "(pruner=shortgpt)")
    influence = stats["block_influence"].double().clone()
    gone = [i for i in structure.unprotected if not current.heads[i].any() and not current.channels[i].any()]
    influence[gone] = float("-inf")
    order = [i for i in torch.sort(influence, stable=True).indices.tolist() if i in structure.unprotected]
    layer_params = structure.n_units * structure.head_params + structure.ffn * structure.channel_params
    n = min(range(len(order) + 1), key=lambda k: (abs(k * layer_params / structure.decoder_params - target), k))
    n = max(n, len(gone))
    if n == 0 and target > 0:
        log.warning("ShortGPT removes whole layers: sparsity %s is closer to none than to one layer (%.4f of the "
                    "decoder), so this level is the dense model", target, layer_params / structure.decoder_params)
    masks = current.clone()
    for i in order[:n]:
        masks.heads[i] = False
        masks.channels[i] = False
    return Cut(masks, sparsity(masks, structure), target)


def cut_levelwise(*_, **__) -> Cut:
    """Methods whose levels are computed one by one (SlimGPT) have no scores to cut: their levels are read whole."""
    raise GispError("ranking=levelwise levels are computed per target, not cut from scores (pruner=slimgpt)")


RANKINGS = {"global": cut_global, "local": cut_local, "owl": cut_owl, "layers": cut_layers, "levelwise": cut_levelwise}
"""ranking name -> cut(heads, channels, current, structure, target, stats=..., pruner=...): how a one-shot method
cuts a level from its stored scores (and per-layer statistics)."""
