"""The typed settings of a reconstruction (conf/reconstruct): how the weights that remain at a level are updated
after its heads and channels are removed.

- `none`: the level as its pruner defines it (masks; FLAP's levels with FLAP's output bias);
- `bias`: FLAP's output-bias compensation for any pruner: o_proj / down_proj get W[:, pruned] @ mean(x[pruned]) over
  the dense model's inputs x (what the removed inputs added on average);
- `lsq`: layer by layer from the first, the kept input columns of o_proj and down_proj (and an output bias with
  `intercept`) refitted by ridge least squares so that each reproduces the DENSE layer's output from the inputs the
  already reconstructed layers produce (gisp.reconstruct.layerwise).

`definition()` is what defines a reconstructed level's weights (with the trajectory, the level and the data's hash:
its address in the store).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from gisp.data.recipes import recipe_from_fields
from gisp.errors import GispError

METHODS = ("none", "bias", "lsq")
# Settings that change how a reconstruction runs, never its weights.
EXECUTION_ONLY = ("batch_size",)


@dataclass(frozen=True)
class ReconstructSettings:
    method: str = "none"
    damp: float = 0.01  # lsq: ridge damping, as a fraction of the mean diagonal of each Gram matrix
    intercept: bool = False  # lsq: fit an output bias of o_proj / down_proj too
    # lsq: refit each block to its own unpruned output on the reconstructed stream (local, measured better) or to the
    # dense model's output on the dense stream (dense); experiments/reconstruction/README.md has the figures
    target: str = "local"
    tokens: int = 8192  # reconstruction data: tokens of forward passes (no gradients)
    seq_len: int = 128  # text windows; items (questions, pairs) are cut to it
    batch_size: int = 8
    seed: int = 0
    data: dict | None = None  # a conf/data node; None: the run's calibration recipe (disjoint from evaluation)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def definition(self, data_record: dict | None = None) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in EXECUTION_ONLY and k != "data"}
        if self.method == "bias":  # the ridge settings play no part in FLAP's formula
            out = {k: v for k, v in out.items() if k not in ("damp", "intercept", "target")}
        return {**out, "data": data_record}


def reconstruct_settings(node: dict | None) -> ReconstructSettings:
    """Typed, checked settings of a `reconstruct` config node (plain values); GispError naming the field and the fix."""
    node = dict(node or {"method": "none"})
    known = {f.name for f in fields(ReconstructSettings)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise GispError(f"reconstruct: unknown field(s) {unknown}; its fields are {sorted(known)} (conf/reconstruct/)")
    if node.get("data") is not None and not isinstance(node["data"], dict):
        raise GispError(f"reconstruct.data={node['data']!r}: reconstruct.data takes a whole data node; pick one of "
                        f"conf/data with +data@reconstruct.data={node['data']}")
    s = ReconstructSettings(**node)
    if s.method not in METHODS:
        raise GispError(f"reconstruct.method={s.method!r} is not one of {METHODS} (reconstruct=none|bias|lsq)")
    for name in ("tokens", "seq_len", "batch_size"):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GispError(f"reconstruct.{name} must be an int >= 1, got {value!r}")
    if isinstance(s.damp, bool) or not isinstance(s.damp, (int, float)) or s.damp < 0:
        raise GispError(f"reconstruct.damp must be a number >= 0 (a fraction of the mean diagonal), got {s.damp!r}")
    if s.target not in ("dense", "local"):
        raise GispError(f"reconstruct.target must be dense or local, got {s.target!r}")
    if not isinstance(s.intercept, bool):
        raise GispError(f"reconstruct.intercept must be true or false, got {s.intercept!r}")
    return s


def reconstruct_recipe(settings: ReconstructSettings, calibration):
    """A reconstruction's data recipe: its `data` node, or the run's calibration recipe (disjoint from evaluation)."""
    return recipe_from_fields(settings.data) if settings.data is not None else calibration


def check_reconstruct(reconstruct: ReconstructSettings, pruner: str, processes: int = 1) -> None:
    """Combinations a reconstruction refuses, before anything is loaded (`pruner`: the run's pruner's name)."""
    if not reconstruct.enabled:
        return
    if pruner == "slimgpt":
        raise GispError("pruner=slimgpt updates the remaining weights itself (its OBS updates): reconstruct="
                        f"{reconstruct.method} would replace them; use reconstruct=none with slimgpt")
    if processes > 1:
        raise GispError(f"reconstruct={reconstruct.method} with {processes} processes: a reconstruction runs in one "
                        "process; prune over the processes with eval=none, then evaluate the levels reconstructed "
                        f"with: python -m gisp.evaluate run_dir=RUN reconstruct={reconstruct.method}")
