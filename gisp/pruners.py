"""Pruning methods in one harness: each is a score per head and channel plus a ranking rule (conf/pruner).

| method     | signal (pass)               | score per structure                                  | ranking          |
|------------|-----------------------------|------------------------------------------------------|------------------|
| gisp       | gradients, every step       | sum |W * g_bar|, block-normalized                    | global, iterative |
| oneshot    | gradients, once (dense)     | the same                                             | global           |
| llm_pruner | gradients, once             | sum |W * g_bar| (first-order Taylor, element-wise)   | local            |
| wanda_sp   | o/down inputs, once         | mean over rows of |W| * ||x_j||, summed per head      | local            |
| flap       | o/down inputs, once         | Var(x_j) * ||W[:, j]||^2, standardized per module    | global, + bias   |
| magnitude  | weights                     | sum of W^2 over the structure                        | local            |
| random     | none                        | uniform random                                       | local            |

Every method sees the same calibration set, skips the same protected layers, and lands on the same parameter
sparsity; a head is the same structure everywhere (q rows + o columns with GQA, + k/v rows without). "local" is the
baselines' uniform rule: every unprotected layer loses the same number of heads and of channels. Scores are pure
functions of weights and statistics so tests can hold them against slow per-structure loops.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import Self

from gisp.errors import GispError
from gisp.masks import Masks, OutputBias, sparsity
from gisp.planning import Plan, plan_step
from gisp.structures import LayerModules, ModelStructure

# score -> what it needs from the model: a gradient pass, an activation pass, or only the weights
SIGNALS = {"taylor": "gradients", "wanda": "activations", "fluctuation": "activations", "magnitude": "weights",
           "random": "weights"}
RANKINGS = ("global", "local")


@dataclass(frozen=True)
class PrunerSpec:
    name: str
    score: str
    ranking: str
    iterative: bool = False
    bias_compensation: bool = False
    seed: int = 0

    @property
    def signal(self) -> str:
        return SIGNALS[self.score]


def pruner_spec(cfg: Mapping[str, Any]) -> PrunerSpec:
    """Read and check a conf/pruner entry (before any model is loaded)."""
    spec = PrunerSpec(name=str(cfg["name"]), score=str(cfg["score"]), ranking=str(cfg["ranking"]),
                      iterative=bool(cfg.get("iterative", False)),
                      bias_compensation=bool(cfg.get("bias_compensation", False)), seed=int(cfg.get("seed", 0)))
    if spec.score not in SIGNALS:
        raise GispError(f"unknown pruner.score '{spec.score}'; choose one of {sorted(SIGNALS)}")
    if spec.ranking not in RANKINGS:
        raise GispError(f"unknown pruner.ranking '{spec.ranking}'; choose one of {RANKINGS}")
    if spec.iterative and (spec.score != "taylor" or spec.ranking != "global"):
        raise GispError("pruner.iterative=true is GISP: it needs pruner.score=taylor and pruner.ranking=global "
                        f"(got {spec.score}, {spec.ranking}); use pruner=gisp, or iterative=false for a baseline")
    if spec.bias_compensation and spec.signal != "activations":
        raise GispError("pruner.bias_compensation needs the mean inputs of an activation pass: use it with "
                        f"pruner.score=fluctuation or wanda (got {spec.score})")
    return spec


# ---------------------------------------------------------------------------------------------------------------
# Scores (raw, per layer). Inputs of o_proj are H*d_h features (head h = features h*d_h..), of down_proj F features.


def wanda_sp_scores(o_weight: torch.Tensor, down_weight: torch.Tensor, attn_mean_sq: torch.Tensor,
                    mlp_mean_sq: torch.Tensor, structure: ModelStructure) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda-sp (FLAP's structured Wanda): per input feature j the mean over output rows of |W_ij| * ||x_j||, with
    ||x_j|| the root mean square of feature j over the calibration tokens; a head sums its d_h features."""
    attn = (o_weight.detach().float().abs() * attn_mean_sq.float().sqrt()[None, :]).mean(dim=0)  # (H*d_h,)
    mlp = (down_weight.detach().float().abs() * mlp_mean_sq.float().sqrt()[None, :]).mean(dim=0)  # (F,)
    return attn.view(structure.n_heads, structure.head_dim).sum(dim=1), mlp


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def flap_scores(o_weight: torch.Tensor, down_weight: torch.Tensor, attn_var: torch.Tensor, mlp_var: torch.Tensor,
                structure: ModelStructure) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's WIFV fluctuation metric, standardized within each layer's module so heads and channels of all layers
    share one ranking (FLAP's "AL-AM"): feature j scores Var(x_j) * ||W[:, j]||^2; a head is the MEAN of its
    features' standardized scores, a channel its own."""
    attn = attn_var.float() * o_weight.detach().float().pow(2).sum(dim=0)  # (H*d_h,)
    mlp = mlp_var.float() * down_weight.detach().float().pow(2).sum(dim=0)  # (F,)
    heads = _standardize(attn).view(structure.n_heads, structure.head_dim).mean(dim=1)
    return heads, _standardize(mlp)


def magnitude_scores(layer: LayerModules, structure: ModelStructure) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 norm of each structure's weights (LLM-Pruner's magnitude floor)."""
    H, d_h, d = structure.n_heads, structure.head_dim, structure.hidden

    def sq(linear: torch.nn.Linear) -> torch.Tensor:
        return linear.weight.detach().float().pow(2)

    heads = sq(layer.q).view(H, d_h, d).sum(dim=(1, 2)) + sq(layer.o).view(d, H, d_h).sum(dim=(0, 2))
    if not structure.gqa:
        heads += sq(layer.k).view(H, d_h, d).sum(dim=(1, 2)) + sq(layer.v).view(H, d_h, d).sum(dim=(1, 2))
    channels = sq(layer.gate).sum(dim=1) + sq(layer.up).sum(dim=1) + sq(layer.down).sum(dim=0)
    return heads.cpu(), channels.cpu()


def random_scores(structure: ModelStructure, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(structure.n_layers, structure.n_heads, generator=g),
            torch.rand(structure.n_layers, structure.ffn, generator=g))


def protect(heads: torch.Tensor, channels: torch.Tensor, structure: ModelStructure
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Protected layers get +inf: never pruned by any ranking."""
    heads, channels = heads.clone().float(), channels.clone().float()
    heads[list(structure.protected)] = float("inf")
    channels[list(structure.protected)] = float("inf")
    return heads, channels


def weight_scores(spec: PrunerSpec, layers: list[LayerModules], structure: ModelStructure
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (L, H), (L, F) of the methods that need no calibration pass."""
    if spec.score == "random":
        return protect(*random_scores(structure, spec.seed), structure)
    if spec.score == "magnitude":
        heads = torch.zeros(structure.n_layers, structure.n_heads)
        channels = torch.zeros(structure.n_layers, structure.ffn)
        for i in structure.unprotected:
            heads[i], channels[i] = magnitude_scores(layers[i], structure)
        return protect(heads, channels, structure)
    raise GispError(f"pruner.score={spec.score} needs a calibration pass")


def activation_scores(spec: PrunerSpec, layers: list[LayerModules], structure: ModelStructure,
                      moments: dict[tuple[int, str], InputMoments]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (L, H), (L, F) of wanda_sp / flap from the input moments of o_proj and down_proj."""
    heads = torch.zeros(structure.n_layers, structure.n_heads)
    channels = torch.zeros(structure.n_layers, structure.ffn)
    for i in structure.unprotected:
        attn, mlp = moments[(i, "attn")], moments[(i, "mlp")]
        if spec.score == "wanda":
            h, c = wanda_sp_scores(layers[i].o.weight, layers[i].down.weight, attn.mean_sq, mlp.mean_sq, structure)
        elif spec.score == "fluctuation":
            h, c = flap_scores(layers[i].o.weight, layers[i].down.weight, attn.variance, mlp.variance, structure)
        else:
            raise GispError(f"pruner.score={spec.score} is not an activation score")
        heads[i], channels[i] = h.cpu(), c.cpu()
    return protect(heads, channels, structure)


# ---------------------------------------------------------------------------------------------------------------
# Activation statistics


@dataclass
class InputMoments:
    """Per-feature sums over calibration tokens (float64): count, sum x, sum x^2."""

    count: torch.Tensor
    total: torch.Tensor
    total_sq: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.total_sq / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance of each feature over all tokens."""
        return (self.mean_sq - self.mean.pow(2)).clamp_min(0.0)


class InputRecorder:
    """Context manager: forward pre-hooks on o_proj and down_proj of the unprotected layers that accumulate their
    inputs' moments over the non-padding tokens. The hooks are removed on exit, also after an error."""

    def __init__(self, layers: list[LayerModules], structure: ModelStructure):
        self.layers = layers
        self.structure = structure
        self.moments: dict[tuple[int, str], InputMoments] = {}
        self.token_mask: torch.Tensor | None = None  # (B, T) bool of the current batch; None = every token
        self._handles: list = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Self:
        if self.active:
            raise GispError("the input recorder is already recording")
        for i in self.structure.unprotected:
            self._handles.append(self.layers[i].o.register_forward_pre_hook(self._hook((i, "attn"))))
            self._handles.append(self.layers[i].down.register_forward_pre_hook(self._hook((i, "mlp"))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.token_mask = None

    def _hook(self, key: tuple[int, str]):
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()  # (B, T, features)
            rows = x[self.token_mask.to(x.device)] if self.token_mask is not None else x.reshape(-1, x.shape[-1])
            rows = rows.double()
            m = self.moments.get(key)
            if m is None:
                zeros = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
                m = self.moments[key] = InputMoments(torch.zeros((), dtype=torch.float64, device=x.device),
                                                     zeros, zeros.clone())
            m.count += rows.shape[0]
            m.total += rows.sum(dim=0)
            m.total_sq += rows.pow(2).sum(dim=0)

        return pre_hook


def flap_bias(layers: list[LayerModules], structure: ModelStructure, masks: Masks,
              moments: dict[tuple[int, str], InputMoments]) -> OutputBias:
    """FLAP's bias compensation: o_proj (down_proj) gets bias W[:, pruned] @ mean(x[pruned]), what the pruned
    inputs added on average, so the module's mean output over the calibration tokens is unchanged."""
    d_h = structure.head_dim
    attn = torch.zeros(structure.n_layers, structure.hidden)
    mlp = torch.zeros(structure.n_layers, structure.hidden)
    for i in structure.unprotected:
        pruned_features = (~masks.heads[i]).repeat_interleave(d_h)
        mean = moments[(i, "attn")].mean.cpu() * pruned_features
        attn[i] = (layers[i].o.weight.detach().double().cpu() @ mean).float()
        mean = moments[(i, "mlp")].mean.cpu() * (~masks.channels[i])
        mlp[i] = (layers[i].down.weight.detach().double().cpu() @ mean).float()
    return OutputBias(attn, mlp)


# ---------------------------------------------------------------------------------------------------------------
# Rankings


def plan_global(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure,
                target: float) -> Plan:
    """One global ranking of all heads and channels (protected +inf), pruned by parameters to land on `target`."""
    return plan_step(heads, channels, current, structure, structure.n_structures, cap=target)


def local_counts(structure: ModelStructure, target: float) -> tuple[int, int]:
    """Heads and channels to prune in EVERY unprotected layer so the decoder lands on `target` sparsity: the
    layer ratio r fixes the heads (int(r H), as wanda_sp / LLM-Pruner round), channels fill the rest."""
    n_unprotected = len(structure.unprotected)
    per_layer = structure.n_heads * structure.head_params + structure.ffn * structure.channel_params
    budget = target * structure.decoder_params / n_unprotected  # parameters each layer gives up
    ratio = budget / per_layer
    if ratio >= 1.0:
        raise GispError(f"sparsity {target} needs more than every structure of the unprotected layers")
    n_heads = int(ratio * structure.n_heads + 1e-9)
    n_channels = round((budget - n_heads * structure.head_params) / structure.channel_params)
    return n_heads, min(max(n_channels, 0), structure.ffn)


def plan_local(heads: torch.Tensor, channels: torch.Tensor, current: Masks, structure: ModelStructure,
               target: float) -> Plan:
    """The baselines' uniform rule: each unprotected layer prunes its own lowest-scored heads and channels, the
    same number in every layer. Already pruned structures go first, so levels cut from one score are nested."""
    n_heads, n_channels = local_counts(structure, target)
    kept_heads, kept_channels = current.heads.clone(), current.channels.clone()
    for i in structure.unprotected:
        for scores, kept, n in ((heads[i], kept_heads[i], n_heads), (channels[i], kept_channels[i], n_channels)):
            key = scores.double().clone()
            key[~kept] = float("-inf")
            n = max(n, int((~kept).sum()))
            kept[torch.sort(key, stable=True).indices[:n]] = False
    masks = Masks(kept_heads, kept_channels)
    return Plan(masks, sparsity(masks, structure), target)


PLANNERS = {"global": plan_global, "local": plan_local}


def random_plan(structure: ModelStructure, target: float, seed: int = 0) -> Plan:
    """The floor as one call: random structures of the unprotected layers, ranked globally, cut to `target`."""
    heads, channels = protect(*random_scores(structure, seed), structure)
    return plan_global(heads, channels, Masks.dense(structure), structure, target)
