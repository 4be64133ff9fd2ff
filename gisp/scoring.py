"""First-order importance of heads and channels (method.md section 2), vectorized per layer.

Per weight s = |W * g_bar| with g_bar the MEAN gradient of the objective over the calibration set (not a sum of
per-sample |w*g|); summed over each structure's weights; then block-wise normalized so that heads (~10x larger
raw scores) and channels can share one global ranking.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gisp.errors import GispError
from gisp.structures import LayerModules, ModelStructure

NORMALIZATIONS = ("reference", "paper", "none")
GradOf = Callable[[torch.Tensor], "torch.Tensor | None"]


def scored_weights(layer: LayerModules, structure: ModelStructure) -> list[nn.Parameter]:
    """Weights whose gradient the score needs: q, o, gate, up, down, and k, v without GQA (GQA heads are q + o)."""
    weights = [layer.q.weight, layer.o.weight, layer.gate.weight, layer.up.weight, layer.down.weight]
    if not structure.gqa:
        weights += [layer.k.weight, layer.v.weight]
    return weights


def _taylor(weight: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    if grad is None:
        raise GispError("a scored weight has no gradient: the scoring pass did not run backward through it")
    return (weight.detach().float() * grad.float()).abs()


def _own_grad(weight: torch.Tensor) -> torch.Tensor | None:
    return weight.grad


def layer_scores(layer: LayerModules, structure: ModelStructure, grad_of: GradOf = _own_grad
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw per-head (H,) and per-channel (F,) sums of |W * g| for one layer; g = grad_of(W) is g_bar."""
    H, d_h, d, F = structure.n_heads, structure.head_dim, structure.hidden, structure.ffn

    def taylor(linear: nn.Linear) -> torch.Tensor:
        return _taylor(linear.weight, grad_of(linear.weight))

    heads = taylor(layer.q).view(H, d_h, d).sum(dim=(1, 2))
    heads += taylor(layer.o).view(d, H, d_h).sum(dim=(0, 2))
    if not structure.gqa:
        heads += taylor(layer.k).view(H, d_h, d).sum(dim=(1, 2))
        heads += taylor(layer.v).view(H, d_h, d).sum(dim=(1, 2))
    channels = taylor(layer.gate).sum(dim=1)  # (F,)
    channels += taylor(layer.up).sum(dim=1)
    channels += taylor(layer.down).view(d, F).sum(dim=0)
    return heads.cpu(), channels.cpu()


def normalize(
    heads: torch.Tensor, channels: torch.Tensor, structure: ModelStructure, normalization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise normalization of raw scores (L, H) and (L, F); protected layers must already be +inf.

    reference (GISP code, produced the published numbers): head / (4 d_h d), channel / (3 d_ff), then all scores
    shifted by |min| (order-preserving; kept so logged values match the reference).
    paper (GISP text): each structure divided by its parameter count, head 4 d_h d, channel 3 d.
    none: raw sums (an ablation).
    """
    d_h, d, F = structure.head_dim, structure.hidden, structure.ffn
    if normalization == "reference":
        heads, channels = heads / (4 * d_h * d), channels / (3 * F)
        finite = torch.cat([heads[heads.isfinite()], channels[channels.isfinite()]])
        shift = finite.min().abs() if finite.numel() else 0.0
        return heads + shift, channels + shift
    if normalization == "paper":
        return heads / (4 * d_h * d), channels / (3 * d)
    if normalization == "none":
        return heads, channels
    raise GispError(f"unknown normalization '{normalization}'; choose one of {NORMALIZATIONS}")


def structure_scores(
    layers: list[LayerModules], structure: ModelStructure, normalization: str = "reference",
    grad_of: GradOf = _own_grad,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized scores (L, H) and (L, F) from the mean gradients of every unprotected layer (`grad_of(W)`,
    by default `W.grad`); protected layers +inf."""
    L, H, F = structure.n_layers, structure.n_heads, structure.ffn
    heads = torch.full((L, H), float("inf"))
    channels = torch.full((L, F), float("inf"))
    for i in structure.unprotected:
        heads[i], channels[i] = layer_scores(layers[i], structure, grad_of)
    return normalize(heads, channels, structure, normalization)
