"""One pruning step as a pure plan: global ranking of every head and channel, then the prefix to prune.

The plan is separate from applying it (masks.MaskApplier) so it can be tested, logged and replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gisp.masks import Masks, sparsity
from gisp.structures import ModelStructure


@dataclass(frozen=True)
class Plan:
    masks: Masks
    sparsity: float
    landed_target: float | None  # the sparsity target this step was capped at, if any


def global_order(heads: torch.Tensor, channels: torch.Tensor, current: Masks) -> torch.Tensor:
    """Indices of all structures (heads of all layers first, then channels) from first to last to prune.

    Already pruned structures go first whatever their score (nested masks are guaranteed, not left to numerics),
    protected ones (+inf) last; ties break by index, so the order is deterministic (stable sort).
    """
    key = torch.cat([heads.flatten(), channels.flatten()]).double()
    key[current.flat_pruned()] = float("-inf")
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
    L, H = structure.n_layers, structure.n_heads
    order = global_order(heads, channels, current)
    prunable = int(torch.isfinite(torch.cat([heads.flatten(), channels.flatten()])).sum())
    n_current = current.n_pruned
    n = min(max(n_prune, n_current), prunable)  # protected structures (+inf) are never pruned
    cost = torch.where(order < L * H, structure.head_params, structure.channel_params)
    cum = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(cost, 0)])  # cum[m] = params in first m
    landed = None
    if cap is not None and cum[n] / structure.decoder_params >= cap:
        candidates = cum[n_current : n + 1].double() / structure.decoder_params
        n = n_current + int(torch.argmin((candidates - cap).abs()))
        landed = cap
    flat_pruned = torch.zeros(order.numel(), dtype=torch.bool)
    flat_pruned[order[:n]] = True
    masks = Masks(~flat_pruned[: L * H].view(L, H), ~flat_pruned[L * H :].view(L, structure.ffn))
    return Plan(masks, sparsity(masks, structure), landed)
