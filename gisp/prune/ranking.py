"""Rankings as pure plans: which heads and channels a step or a level prunes, given the scores.

`global`: one ranking of every head and channel of every unprotected layer (GISP, FLAP). `local`: the baselines'
uniform rule, each unprotected layer prunes the same number of heads and of channels. A plan is separate from
applying it (masks.MaskApplier) so it can be tested, logged and replayed.

Scores are per head UNIT (L, n_units): a query head in `gqa_mode=query`, a whole KV group in `gqa_mode=group`;
plans rank units and return query-head masks (L, H) in which a group is always kept or pruned whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gisp.errors import GispError
from gisp.models.structure import ModelStructure
from gisp.prune.masks import Masks, expand_units, group_heads, masks_from_flat, n_pruned, sparsity, unit_masks


@dataclass(frozen=True)
class Plan:
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


def plan_step(
    heads: torch.Tensor,
    channels: torch.Tensor,
    current: Masks,
    structure: ModelStructure,
    n_prune: int,
    cap: float | None = None,
) -> Plan:
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
    return Plan(masks, sparsity(masks, structure), landed)


def plan_global(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure,
                target: float) -> Plan:
    """One global ranking of all heads and channels (protected +inf), pruned by parameters to land on `target`."""
    return plan_step(heads, channels, current, structure, structure.n_structures, cap=target)


def local_counts(structure: ModelStructure, target: float) -> tuple[int, int]:
    """Heads and channels to prune in EVERY unprotected layer so the decoder lands on `target` sparsity: the
    layer ratio r fixes the heads (int(r H), as wanda_sp / LLM-Pruner round), channels fill the rest."""
    n_unprotected = len(structure.unprotected)
    per_layer = structure.n_units * structure.head_params + structure.ffn * structure.channel_params
    budget = target * structure.decoder_params / n_unprotected  # parameters each layer gives up
    ratio = budget / per_layer
    if ratio >= 1.0:
        raise GispError(f"sparsity {target} needs more than every structure of the unprotected layers")
    n_heads = int(ratio * structure.n_units + 1e-9)
    n_channels = round((budget - n_heads * structure.head_params) / structure.channel_params)
    return n_heads, min(max(n_channels, 0), structure.ffn)


def plan_local(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure,
               target: float) -> Plan:
    """The baselines' uniform rule: each unprotected layer prunes its own lowest-scored heads and channels, the
    same number in every layer. Already pruned structures go first, so levels cut from one score are nested."""
    _check_scores(heads, channels, structure)
    n_heads, n_channels = local_counts(structure, target)
    units = unit_masks(current, structure)
    kept_heads, kept_channels = units.heads.clone(), units.channels.clone()
    for i in structure.unprotected:
        for scores, kept, n in ((heads[i], kept_heads[i], n_heads), (channels[i], kept_channels[i], n_channels)):
            key = scores.double().clone()
            key[~kept] = float("-inf")
            n = max(n, int((~kept).sum()))
            kept[torch.sort(key, stable=True).indices[:n]] = False
    masks = expand_units(Masks(kept_heads, kept_channels), structure)
    return Plan(masks, sparsity(masks, structure), target)


RANKINGS = {"global": plan_global, "local": plan_local}
"""ranking name -> plan(heads, channels, current, structure, target): how a one-shot method cuts a level."""
