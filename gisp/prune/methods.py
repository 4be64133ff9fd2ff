"""Pruning methods in one harness: each is a score (gisp.prune.importance) plus a ranking rule (conf/pruner).

| method     | signal (pass)               | score per structure                                  | ranking          |
|------------|-----------------------------|------------------------------------------------------|------------------|
| gisp       | gradients, every step       | sum |W * g_bar|, block-normalized                    | global, iterative |
| oneshot    | gradients, once (dense)     | the same                                             | global           |
| llm_pruner | gradients, once             | sum |W * g_bar| (first-order Taylor, element-wise)   | local            |
| wanda_sp   | o/down inputs, once         | mean over rows of |W| * ||x_j||, summed per head      | local            |
| flap       | o/down inputs, once         | Var(x_j) * ||W[:, j]||^2, standardized per module    | global, + bias   |
| owl        | all projection inputs, once | Wanda-sp's, + each layer's outlier ratio             | per-layer (OWL)  |
| shortgpt   | layer in/out states, once   | each layer's Block Influence, 1 - mean cos(in, out)  | whole layers     |
| slimgpt    | o/down input Hessians, per level | OBS error; the remaining columns updated (OBS) | per layer, log-up |
| magnitude  | weights                     | sum of W^2 over the structure                        | local            |
| random     | none                        | uniform random                                       | local            |

Every method sees the same calibration set, skips the same protected layers, and lands on the same parameter
sparsity; a head is the same structure everywhere (q rows + o columns with GQA, + k/v rows without).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gisp.errors import GispError
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.activations import InputMoments
from gisp.prune.importance import NORMALIZATIONS, get_score, protect, random_scores
from gisp.prune.masks import Masks, OutputBias
from gisp.prune.ranking import RANKINGS, Cut, cut_global

GRAD_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "float32": torch.float32, "float64": torch.float64}
# Methods' own settings (`pruner.options`) and their defaults: OWL's threshold M and range lambda (the OWL release's
# Hyper_m 5 and Lamda 0.08, also the GISP reference's owl_sp configs); SlimGPT's Hessian damping (the release's
# percdamp) and its first layer's ratio as a fraction of the last's (the release's 20% recipe: 0.0625 / 0.25)
OPTIONS: dict[str, Any] = {"outlier_m": 5.0, "outlier_lambda": 0.08, "percdamp": 0.01, "min_ratio_fraction": 0.25}


@dataclass(frozen=True)
class PrunerSpec:
    """One method: its score, its ranking rule, and the settings that only some scores use."""

    name: str
    score: str
    ranking: str
    iterative: bool = False
    bias_compensation: bool = False
    seed: int = 0
    normalization: str = "reference"  # gradient scores: reference (GISP code) | paper (GISP text) | none
    grad_dtype: str | None = None  # gradient scores: accumulate the mean gradient in this dtype (float32 for bf16)
    options: tuple[tuple[str, Any], ...] = ()  # a method's own settings (OWL's outlier_m, outlier_lambda)

    @property
    def signal(self) -> str:
        return get_score(self.score).signal

    def option(self, name: str) -> Any:
        """A method setting of `options`, or its default (OPTIONS)."""
        return dict(self.options).get(name, OPTIONS[name])

    @property
    def grad_torch_dtype(self) -> torch.dtype | None:
        return GRAD_DTYPES[self.grad_dtype]


def pruner_spec(cfg: Mapping[str, Any]) -> PrunerSpec:
    """Read and check a conf/pruner entry (before any model is loaded), or a stored definition's pruner."""
    options = cfg.get("options") or {}
    options = dict(options) if isinstance(options, (list, tuple)) else options  # a definition stores pairs
    try:
        spec = PrunerSpec(name=str(cfg["name"]), score=str(cfg["score"]), ranking=str(cfg["ranking"]),
                          iterative=bool(cfg.get("iterative", False)),
                          bias_compensation=bool(cfg.get("bias_compensation", False)), seed=int(cfg.get("seed", 0)),
                          normalization=str(cfg.get("normalization") or "reference"),
                          grad_dtype=cfg.get("grad_dtype"), options=tuple(sorted(options.items())))
    except KeyError as e:
        raise GispError(f"the pruner config lacks {e}; see conf/pruner/*.yaml for the fields") from None
    signal = get_score(spec.score).signal
    if spec.ranking not in RANKINGS:
        raise GispError(f"unknown pruner.ranking '{spec.ranking}'; choose one of {tuple(RANKINGS)}")
    if spec.iterative and (signal != "gradients" or spec.ranking != "global"):
        raise GispError("pruner.iterative=true is GISP: it needs a gradient score (pruner.score=taylor) and "
                        f"pruner.ranking=global (got {spec.score}, {spec.ranking}); use pruner=gisp, or "
                        "iterative=false for a baseline")
    if (spec.ranking == "levelwise") != (spec.score == "obs"):
        raise GispError("pruner.score=obs and pruner.ranking=levelwise go together (SlimGPT: each level pruned and its "
                        f"weights updated layer by layer; got {spec.score}, {spec.ranking}): use pruner=slimgpt")
    if spec.bias_compensation and signal != "activations":
        raise GispError("pruner.bias_compensation needs the mean inputs of an activation pass: use it with "
                        f"pruner.score=fluctuation or wanda (got {spec.score})")
    if spec.normalization not in NORMALIZATIONS:
        raise GispError(f"unknown pruner.normalization '{spec.normalization}'; choose one of {NORMALIZATIONS}")
    if spec.grad_dtype not in GRAD_DTYPES:
        raise GispError(f"pruner.grad_dtype must be null, float32 or float64, got {spec.grad_dtype}")
    unknown = sorted(set(dict(spec.options)) - set(OPTIONS))
    if unknown:
        raise GispError(f"unknown pruner.options {unknown}; the methods' options are {sorted(OPTIONS)}")
    for name, value in spec.options:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise GispError(f"pruner.options.{name} must be a number >= 0, got {value!r}")
    return spec


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


def random_cut(structure: ModelStructure, target: float, seed: int = 0) -> Cut:
    """The floor as one call: random structures of the unprotected layers, ranked globally, cut to `target`."""
    heads, channels = protect(*random_scores(structure, seed), structure)
    return cut_global(heads, channels, Masks.dense(structure), structure, target)
