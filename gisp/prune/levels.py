"""Sparsity levels read out of a trajectory: any target t, exactly, without another scoring pass.

Iterative trajectory: step k prunes the structures of its ORDER (ascending score, after the ones pruned before).
The level at t is the masks of the last step below t plus the prefix of the next step's order whose parameter
sparsity is closest to t (within one structure). Prefixes of nested orders are nested, so levels are nested.
One-shot trajectory: the level is the method's ranking rule (global or local) applied to the stored scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from gisp.errors import GispError
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.masks import Masks, OutputBias, flat_pruned, masks_from_flat, n_pruned, sparsity
from gisp.prune.methods import PrunerSpec, flap_bias
from gisp.prune.ranking import RANKINGS
from gisp.prune.trajectory import Trajectory


@dataclass
class Level:
    """One sparsity level: its masks (and FLAP's output bias), where it comes from, and its measured sparsity."""

    target: float
    masks: Masks
    sparsity: float
    step: int  # the step whose order (or scores) the level is cut from; 0 = dense
    prefix: int | None = None  # how many structures of that step's order are pruned (iterative)
    bias: OutputBias | None = None
    structural_ratio: float = 0.0  # pruned head units + channels / all of them
    # A reconstruction's new kept columns of o_proj ("attn.{i}") and down_proj ("mlp.{i}"), gisp.reconstruct
    weights: dict[str, torch.Tensor] | None = None
    reconstruction: dict | None = None  # its record (method, id, seconds), when the level is reconstructed

    def record(self) -> dict:
        return {"sparsity": self.sparsity, "step": self.step, "prefix": self.prefix,
                "structural_ratio": self.structural_ratio}


def structure_costs(order: torch.Tensor, structure: ModelStructure) -> torch.Tensor:
    """Parameters pruned by each structure of a flat order (a head or a channel)."""
    is_head = order < structure.n_layers * structure.n_units
    return torch.where(is_head, structure.head_params, structure.channel_params).to(torch.long)


def closest_prefix(base: Masks, order: torch.Tensor, structure: ModelStructure, target: float) -> int:
    """How many structures of `order`, pruned on top of `base`, land closest to `target` parameter sparsity (ties:
    the shorter prefix)."""
    base_params = round(sparsity(base, structure) * structure.decoder_params)
    cum = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(structure_costs(order, structure), 0)])
    candidates = (base_params + cum).double() / structure.decoder_params
    return int(torch.argmin((candidates - target).abs()))


def iterative_level(traj: Trajectory, structure: ModelStructure, target: float) -> Level:
    """The level at `target` of an iterative trajectory (GispError when the trajectory does not reach it)."""
    if target <= 0.0:
        return Level(target, Masks.dense(structure), 0.0, 0, 0)
    previous = Masks.dense(structure)
    for rec in traj.steps:
        if rec["sparsity"] >= target:
            order = traj.order_at(rec["step"])
            m = closest_prefix(previous, order, structure, target)
            pruned = flat_pruned(previous, structure).clone()
            pruned[order[:m]] = True
            masks = masks_from_flat(pruned, structure)
            return Level(target, masks, sparsity(masks, structure), rec["step"], m,
                         structural_ratio=n_pruned(masks, structure) / structure.n_structures)
        previous = traj.masks_at(rec["step"])
    raise GispError(f"sparsity {target} is beyond the trajectory {traj.directory} (it reaches {traj.reached:.4f} "
                    f"after {traj.last_step} steps): prune further with gisp.run (sparsity=[...,{target}])")


def oneshot_level(traj: Trajectory, structure: ModelStructure, target: float, cut: Callable[..., object],
                  bias: Callable[[Masks, dict[str, torch.Tensor]], OutputBias] | None = None,
                  pruner: PrunerSpec | None = None) -> Level:
    """The level at `target` of a one-shot method: its ranking rule `cut` on the stored scores (and per-layer
    statistics stored with them: OWL's outlier ratios, ShortGPT's block influence)."""
    if not traj.steps:
        raise GispError(f"the trajectory {traj.directory} has no scores yet: run gisp.run first")
    step = traj.steps[0]["step"]
    tensors = traj.scores_at(step)
    if target <= 0.0:
        return Level(target, Masks.dense(structure), 0.0, 0, None)
    masks = cut(tensors["heads"], tensors["channels"], Masks.dense(structure), structure, target, stats=tensors,
                 pruner=pruner).masks
    level_bias = bias(masks, tensors) if bias is not None else None
    return Level(target, masks, sparsity(masks, structure), step, None, level_bias,
                 structural_ratio=n_pruned(masks, structure) / structure.n_structures)


def separate_level(traj: Trajectory, structure: ModelStructure, target: float) -> Level:
    """The level at `target` of a method whose levels are computed one by one (not nested: SlimGPT), with the new
    weights it computed; refused, naming how to compute it, when it was not."""
    if target <= 0.0:
        return Level(target, Masks.dense(structure), 0.0, 0, None)
    record = traj.level_step(target)
    if record is None:
        done = traj.separate_levels()
        raise GispError(f"sparsity {target:g} was not computed in {traj.directory} (its levels: {done}): this method's "
                        "levels are not nested, each target is its own computation; compute it with gisp.run "
                        f"(sparsity=[...,{target:g}]; the run dir's command with the target added)")
    masks = traj.masks_at(record["step"])
    return Level(target, masks, sparsity(masks, structure), record["step"], None,
                 structural_ratio=n_pruned(masks, structure) / structure.n_structures,
                 weights=traj.weights_at(record["step"]))


def landing_tolerance(structure: ModelStructure, ranking: str) -> float:
    """How far (in parameter sparsity) a level may land from its target: one structure for a global ranking (and
    the iterative trajectory), one channel per unprotected layer for the per-layer rules (local, OWL), one whole
    layer for ShortGPT's layer removal."""
    if ranking in ("local", "owl", "levelwise"):
        return len(structure.unprotected) * structure.channel_params / structure.decoder_params
    if ranking == "layers":
        layer = structure.n_units * structure.head_params + structure.ffn * structure.channel_params
        return layer / structure.decoder_params
    return max(structure.head_params, structure.channel_params) / structure.decoder_params


def read_level(traj: Trajectory, pruner: PrunerSpec, structure: ModelStructure, layers: list[LayerModules] | None,
               target: float, with_bias: bool = True) -> Level:
    """The level at `target` of a trajectory made by `pruner` (an exact read-out: no scoring pass), refused when it
    does not land within `landing_tolerance` of the target (a damaged or edited trajectory). FLAP's output bias needs
    the model's `layers` (its weights); `with_bias=False` reads the masks alone."""
    level = _read_level(traj, pruner, structure, layers, target, with_bias)
    tolerance = landing_tolerance(structure, "global" if pruner.iterative else pruner.ranking)
    if abs(level.sparsity - target) > tolerance + 1e-12:
        raise GispError(f"the level read out at {target:g} has sparsity {level.sparsity:.4f}, not within one structure "
                        f"({tolerance:.4f}) of it: the trajectory in {traj.directory.resolve()} does not hold what its "
                        f"manifest says; delete that folder to compute it again")
    return level


def _read_level(traj: Trajectory, pruner: PrunerSpec, structure: ModelStructure, layers: list[LayerModules] | None,
                target: float, with_bias: bool) -> Level:
    if pruner.iterative:
        return iterative_level(traj, structure, target)
    if pruner.ranking == "levelwise":
        return separate_level(traj, structure, target)
    bias = None
    if pruner.bias_compensation and with_bias:
        if layers is None:
            raise GispError("a FLAP level's output bias needs the model: pass the loaded layers")

        def bias(masks, tensors):  # FLAP: W[:, pruned] @ mean input, from the stored means
            means = {(i, block): SimpleNamespace(mean=tensors[f"{block}_mean"][i])
                     for i in structure.unprotected for block in ("attn", "mlp")}
            return flap_bias(layers, structure, masks, means)
    return oneshot_level(traj, structure, target, RANKINGS[pruner.ranking], bias, pruner)
