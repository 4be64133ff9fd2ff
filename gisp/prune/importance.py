"""Importance scores of heads and channels: one registry entry per score (name -> signal + function).

GISP's score (method.md section 2, `taylor`): per weight s = |W * g_bar| with g_bar the MEAN gradient of the
objective over the calibration set (not a sum of per-sample |w*g|); summed over each structure's weights; then
block-wise normalized so that heads (~10x larger raw scores) and channels can share one global ranking.
A "head" score is per head UNIT (structure.n_units): one query head (`gqa_mode=query`), or one KV head with all its
query heads (`gqa_mode=group`: the unit's q, k, v rows and o columns, normalized by the unit's parameter count).
The baselines' scores (wanda, fluctuation, magnitude, random) are written the same way: pure functions of weights
and statistics, so tests can hold them against slow per-structure loops.

A score's `signal` says which pass feeds it: `gradients` (a backward pass; stats = grad_of(W), the mean gradient),
`activations` (a forward pass; stats = input moments of o_proj / down_proj), `weights` (no pass; stats = None).
Adding a score that uses an existing signal = one function + `@register_score(...)` + a conf/pruner YAML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gisp.errors import GispError
from gisp.models.structure import LayerModules, ModelStructure

if TYPE_CHECKING:
    from gisp.prune.activations import InputMoments

NORMALIZATIONS = ("reference", "paper", "none")
GradOf = Callable[[torch.Tensor], "torch.Tensor | None"]


def scored_weights(layer: LayerModules, structure: ModelStructure) -> list[nn.Parameter]:
    """Weights whose gradient the score needs: q, o, gate, up, down, and k, v when a unit owns them (no GQA, or
    group mode; query-mode GQA heads are q + o)."""
    weights = [layer.q.weight, layer.o.weight, *(m.weight for m in layer.channel_rows), layer.down.weight]
    if structure.kv_in_unit:
        weights += [layer.k.weight, layer.v.weight]
    return weights


# Rows per piece of |W * g|: the float32 product is made in pieces of about 4M elements (16 MB) rather than as one
# full-size temporary, which on CPU cuts the time of a 7B layer's scores 2.5x (memory traffic, not arithmetic).
_PIECE = 1 << 22


def taylor_sums(weight: torch.Tensor, grad: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Sums of |W * g| in float32 over `dim` of a (rows, columns) weight: dim=1 gives (rows,), dim=0 (columns,)."""
    if grad is None:
        raise GispError("a scored weight has no gradient: the scoring pass did not run backward through it")
    w = weight.detach()
    rows = max(1, _PIECE // max(w.shape[1], 1))
    out = torch.zeros(w.shape[1 - dim], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], rows):
        # a float32 copy (never `.float()`, which for a float32 weight is the weight itself), then in place
        piece = w[start:start + rows].to(torch.float32, copy=True)
        piece.mul_(grad[start:start + rows].to(w.device, torch.float32)).abs_()
        if dim == 1:
            out[start:start + rows] = piece.sum(dim=1)
        else:
            out += piece.sum(dim=0)
    return out


def _own_grad(weight: torch.Tensor) -> torch.Tensor | None:
    return weight.grad


def layer_scores(layer: LayerModules, structure: ModelStructure, grad_of: GradOf = _own_grad
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw per-unit (n_units,) and per-channel (F,) sums of |W * g| for one layer; g = grad_of(W) is g_bar."""
    U, d_h = structure.n_units, structure.head_dim
    w = structure.group_size * d_h  # q rows / o columns of one unit

    def rows(linear: nn.Linear) -> torch.Tensor:  # (out_features,)
        return taylor_sums(linear.weight, grad_of(linear.weight), dim=1)

    def cols(linear: nn.Linear) -> torch.Tensor:  # (in_features,)
        return taylor_sums(linear.weight, grad_of(linear.weight), dim=0)

    heads = rows(layer.q).view(U, w).sum(dim=1)
    heads += cols(layer.o).view(U, w).sum(dim=1)
    if structure.kv_in_unit:
        heads += rows(layer.k).view(U, d_h).sum(dim=1)
        heads += rows(layer.v).view(U, d_h).sum(dim=1)
    channels = sum(rows(m) for m in layer.channel_rows) + cols(layer.down)  # (F,)
    return heads.cpu(), channels.cpu()


def normalize(
    heads: torch.Tensor, channels: torch.Tensor, structure: ModelStructure, normalization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise normalization of raw scores (L, n_units) and (L, F); protected layers must already be +inf.

    reference (GISP code, produced the published numbers): head / (4 d_h d), channel / (3 d_ff), then all scores
    shifted by |min| (order-preserving; kept so logged values match the reference).
    paper (GISP text): each structure divided by its parameter count, head 4 d_h d, channel 3 d.
    none: raw sums (an ablation).
    In group mode a unit of g query heads is divided by its (2 g + 2) d_h d parameters instead of 4 d_h d.
    """
    d, F = structure.hidden, structure.ffn
    head_norm = structure.head_norm_params
    if normalization == "reference":
        heads, channels = heads / head_norm, channels / (3 * F)
        finite = torch.cat([heads[heads.isfinite()], channels[channels.isfinite()]])
        shift = finite.min().abs() if finite.numel() else 0.0
        return heads + shift, channels + shift
    if normalization == "paper":
        return heads / head_norm, channels / (3 * d)
    if normalization == "none":
        return heads, channels
    raise GispError(f"unknown normalization '{normalization}'; choose one of {NORMALIZATIONS}")


def structure_scores(
    layers: list[LayerModules], structure: ModelStructure, normalization: str = "reference",
    grad_of: GradOf = _own_grad,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized scores (L, n_units) and (L, F) from the mean gradients of every unprotected layer (`grad_of(W)`,
    by default `W.grad`); protected layers +inf."""
    L, H, F = structure.n_layers, structure.n_units, structure.ffn
    heads = torch.full((L, H), float("inf"))
    channels = torch.full((L, F), float("inf"))
    for i in structure.unprotected:
        heads[i], channels[i] = layer_scores(layers[i], structure, grad_of)
    return normalize(heads, channels, structure, normalization)


# ---------------------------------------------------------------------------------------------------------------
# The baselines' raw scores. Inputs of o_proj are H*d_h features (head h = features h*d_h..), of down_proj F; a
# unit of g query heads (group mode) is g*d_h consecutive features.


def wanda_sp_scores(o_weight: torch.Tensor, down_weight: torch.Tensor, attn_mean_sq: torch.Tensor,
                    mlp_mean_sq: torch.Tensor, structure: ModelStructure) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda-sp (FLAP's structured Wanda): per input feature j the mean over output rows of |W_ij| * ||x_j||, with
    ||x_j|| the root mean square of feature j over the calibration tokens; a head (unit) sums its features."""
    attn = (o_weight.detach().float().abs() * attn_mean_sq.float().sqrt()[None, :]).mean(dim=0)  # (H*d_h,)
    mlp = (down_weight.detach().float().abs() * mlp_mean_sq.float().sqrt()[None, :]).mean(dim=0)  # (F,)
    return attn.view(structure.n_units, -1).sum(dim=1), mlp


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def flap_scores(o_weight: torch.Tensor, down_weight: torch.Tensor, attn_var: torch.Tensor, mlp_var: torch.Tensor,
                structure: ModelStructure) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's WIFV fluctuation metric, standardized within each layer's module so heads and channels of all layers
    share one ranking (FLAP's "AL-AM"): feature j scores Var(x_j) * ||W[:, j]||^2; a head (unit) is the MEAN of
    its features' standardized scores, a channel its own."""
    attn = attn_var.float() * o_weight.detach().float().pow(2).sum(dim=0)  # (H*d_h,)
    mlp = mlp_var.float() * down_weight.detach().float().pow(2).sum(dim=0)  # (F,)
    heads = _standardize(attn).view(structure.n_units, -1).mean(dim=1)
    return heads, _standardize(mlp)


def magnitude_scores(layer: LayerModules, structure: ModelStructure) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 norm of each structure's weights (LLM-Pruner's magnitude floor)."""
    U, d_h, d = structure.n_units, structure.head_dim, structure.hidden
    w = structure.group_size * d_h

    def sq(linear: torch.nn.Linear) -> torch.Tensor:
        return linear.weight.detach().float().pow(2)

    heads = sq(layer.q).view(U, w, d).sum(dim=(1, 2)) + sq(layer.o).view(d, U, w).sum(dim=(0, 2))
    if structure.kv_in_unit:
        heads += sq(layer.k).view(U, d_h, d).sum(dim=(1, 2)) + sq(layer.v).view(U, d_h, d).sum(dim=(1, 2))
    channels = sum(sq(m).sum(dim=1) for m in layer.channel_rows) + sq(layer.down).sum(dim=0)
    return heads.cpu(), channels.cpu()


def random_scores(structure: ModelStructure, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(structure.n_layers, structure.n_units, generator=g),
            torch.rand(structure.n_layers, structure.ffn, generator=g))


def protect(heads: torch.Tensor, channels: torch.Tensor, structure: ModelStructure
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Protected layers get +inf: never pruned by any ranking."""
    heads, channels = heads.clone().float(), channels.clone().float()
    heads[list(structure.protected)] = float("inf")
    channels[list(structure.protected)] = float("inf")
    return heads, channels


# ---------------------------------------------------------------------------------------------------------------
# The registry: score name -> the pass it needs and the model-level function (layers, structure, stats, pruner)
# -> (L, H), (L, F) scores with protected layers at +inf. `pruner` is the method's settings (normalization, seed).

SIGNALS = ("gradients", "activations", "weights", "hessians")
ScoreFn = Callable[[list[LayerModules], ModelStructure, Any, Any], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Importance:
    """`scores(layers, structure, stats, pruner)` returns (heads, channels), or (heads, channels, extra) where `extra`
    holds per-layer statistics stored with the scores for the method's ranking rule (OWL's outlier ratios,
    ShortGPT's block influence). `recorder`: what an activation pass records (`inputs` of `points`, or `blocks`)."""

    name: str
    signal: str  # which pass feeds it: one of SIGNALS
    scores: ScoreFn
    recorder: str = "inputs"  # activations: InputRecorder ("inputs") or BlockRecorder ("blocks")
    points: tuple[str, ...] = ("attn", "mlp")  # InputRecorder points


SCORES: dict[str, Importance] = {}


def register_score(name: str, signal: str, recorder: str = "inputs", points: tuple[str, ...] = ("attn", "mlp")):
    """Decorator: make `fn(layers, structure, stats, pruner)` selectable as `pruner.score=name`."""
    if signal not in SIGNALS:
        raise ValueError(f"signal {signal!r} is not one of {SIGNALS}")

    def decorate(fn: ScoreFn) -> ScoreFn:
        SCORES[name] = Importance(name, signal, fn, recorder, points)
        return fn

    return decorate


def get_score(name: str) -> Importance:
    if name not in SCORES:
        raise GispError(f"unknown pruner.score '{name}'; choose one of {sorted(SCORES)}")
    return SCORES[name]


def _per_layer(layer_fn, structure: ModelStructure) -> tuple[torch.Tensor, torch.Tensor]:
    heads = torch.zeros(structure.n_layers, structure.n_units)
    channels = torch.zeros(structure.n_layers, structure.ffn)
    for i in structure.unprotected:
        h, c = layer_fn(i)
        heads[i], channels[i] = h.cpu(), c.cpu()
    return protect(heads, channels, structure)


@register_score("taylor", "gradients")
def taylor_scores(layers: list[LayerModules], structure: ModelStructure, grad_of: GradOf, pruner) -> tuple:
    """GISP / LLM-Pruner: sum |W * g_bar| per structure, block-normalized by `pruner.normalization`."""
    return structure_scores(layers, structure, pruner.normalization, grad_of)


@register_score("wanda", "activations")
def wanda_scores(layers: list[LayerModules], structure: ModelStructure, moments: dict[tuple[int, str], InputMoments],
                 pruner) -> tuple:
    return _per_layer(lambda i: wanda_sp_scores(layers[i].o.weight, layers[i].down.weight, moments[(i, "attn")].mean_sq,
                                                moments[(i, "mlp")].mean_sq, structure), structure)


@register_score("fluctuation", "activations")
def fluctuation_scores(layers: list[LayerModules], structure: ModelStructure,
                       moments: dict[tuple[int, str], InputMoments], pruner) -> tuple:
    return _per_layer(lambda i: flap_scores(layers[i].o.weight, layers[i].down.weight, moments[(i, "attn")].variance,
                                            moments[(i, "mlp")].variance, structure), structure)


@register_score("magnitude", "weights")
def weight_magnitude_scores(layers: list[LayerModules], structure: ModelStructure, stats: None, pruner) -> tuple:
    return _per_layer(lambda i: magnitude_scores(layers[i], structure), structure)


@register_score("random", "weights")
def seeded_random_scores(layers: list[LayerModules], structure: ModelStructure, stats: None, pruner) -> tuple:
    return protect(*random_scores(structure, pruner.seed), structure)


# ---------------------------------------------------------------------------------------------------------------
# OWL (Yin et al. 2023) on Wanda-sp, and ShortGPT (Men et al. 2024)


def outlier_ratio(layer: LayerModules, moments: dict[str, InputMoments], m: float) -> float:
    """OWL's layerwise outlier ratio: the share of the layer's weights (q, k, v, o, gate, up, down) whose Wanda score
    |W_ij| * ||x_j|| exceeds `m` x the mean score of the whole layer (||x_j||: the root of the summed squares of input
    feature j over the calibration tokens; any common scale cancels in the ratio)."""
    inputs = {"q": "q", "k": "q", "v": "q", "o": "attn", "gate": "gate", "up": "gate", "down": "mlp"}
    pieces = []
    for name, point in inputs.items():
        if getattr(layer, name) is None:  # a plain MLP has no gate
            continue
        weight = getattr(layer, name).weight.detach().float()
        pieces.append((weight.abs() * moments[point].total_sq.float().sqrt().to(weight.device)[None, :]).flatten())
    scores = torch.cat(pieces)
    return float((scores > m * scores.mean()).double().mean())


@register_score("owl", "activations", points=("attn", "mlp", "q", "gate"))
def owl_scores(layers: list[LayerModules], structure: ModelStructure, moments: dict[tuple[int, str], InputMoments],
               pruner) -> tuple:
    """Wanda-sp's head and channel scores, and each layer's outlier ratio for OWL's layerwise sparsity (ranking
    `owl`, gisp.prune.ranking)."""
    heads, channels = wanda_scores(layers, structure, moments, pruner)
    ratios = torch.zeros(structure.n_layers, dtype=torch.float64)
    for i in structure.unprotected:
        ratios[i] = outlier_ratio(layers[i], {p: moments[(i, p)] for p in ("q", "attn", "gate", "mlp")},
                                  pruner.option("outlier_m"))
    return heads, channels, {"outlier_ratio": ratios}


@register_score("block_influence", "activations", recorder="blocks")
def block_influence_scores(layers: list[LayerModules], structure: ModelStructure, moments: dict, pruner) -> tuple:
    """ShortGPT: a layer's Block Influence, 1 - mean cos(input, output hidden state) over the calibration tokens,
    given to all its heads and channels (the ranking `layers` removes whole layers, lowest influence first)."""
    influence = torch.full((structure.n_layers,), float("inf"), dtype=torch.float64)
    for i in structure.unprotected:
        influence[i] = moments[(i, "block")].block_influence
    heads = influence[:, None].expand(structure.n_layers, structure.n_units).float().clone()
    channels = influence[:, None].expand(structure.n_layers, structure.ffn).float().clone()
    return heads, channels, {"block_influence": influence}


@register_score("obs", "hessians")
def obs_scores(layers: list[LayerModules], structure: ModelStructure, stats: Any, pruner) -> tuple:
    """SlimGPT's OBS error is not a score of the dense model: it is computed layer by layer while each level is pruned
    and its weights updated (gisp.reconstruct.slimgpt), with `ranking: levelwise`."""
    raise GispError("pruner.score=obs is computed while each level is pruned (gisp.reconstruct.slimgpt): use it with "
                    "pruner.ranking=levelwise (pruner=slimgpt)")
