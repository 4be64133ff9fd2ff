"""A run dir as an object: the one way to reopen a run (config, trajectory, results, model, levels).

    run = RunDir("outputs/smollm2_135m/2026-11-22_18-00-00")
    live = run.load_model()                 # model, tokenizer, structure, mask applier (dense)
    level = run.level(target=0.4)           # or run.level(step=7): masks (+ FLAP bias) of that level
    live.applier.set(level.masks, level.bias)

`gisp.evaluate`, `gisp.export`, the experiments scripts and the notebook reopen runs through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from gisp.errors import GispError
from gisp.io import read_json
from gisp.models.families import family_spec
from gisp.models.loading import ModelSpec, load_model_and_tokenizer
from gisp.models.structure import LayerModules, ModelStructure, describe, layer_modules
from gisp.prune.masks import MaskApplier, Masks, OutputBias
from gisp.prune.trajectory import Trajectory, target_key


@dataclass
class Level:
    """One sparsity level of a trajectory: its step, its record in the manifest, masks and optional output bias."""

    step: int
    record: dict[str, Any]
    masks: Masks
    bias: OutputBias | None

    @property
    def sparsity(self) -> float:
        return float(self.record["sparsity"])


@dataclass
class LiveModel:
    """A run's dense model in memory with its structure and a mask applier (dense until a level is set)."""

    model: Any
    tokenizer: Any
    structure: ModelStructure
    layers: list[LayerModules]
    applier: MaskApplier

    def set_level(self, level: Level | None) -> None:
        """Apply a level's masks (None: the dense model)."""
        if level is None:
            self.applier.set(Masks.dense(self.structure))
        else:
            self.applier.set(level.masks, level.bias)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise GispError(f"{self.path} is not a directory: give the run dir of a gisp.run (it holds config.yaml "
                            "and trajectory/)")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @cached_property
    def config(self) -> dict[str, Any]:
        """The resolved config the run wrote (plain values)."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise GispError(f"no {path}: is {self.path} a gisp run dir?")
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}

    def model_spec(self, trust_remote_code: bool = False) -> ModelSpec:
        """The run's model; `trust_remote_code` is never taken from the run dir (a received run dir could switch it
        on): only the caller's own setting counts."""
        fields = dict(self.config.get("model") or {})
        fields["trust_remote_code"] = bool(trust_remote_code)
        try:
            return ModelSpec(**fields)
        except TypeError as e:
            raise GispError(f"{self.path / 'config.yaml'}: bad model section ({e})") from None

    @cached_property
    def trajectory(self) -> Trajectory:
        return Trajectory.load(self.path / "trajectory")

    @property
    def protected(self) -> tuple[int, ...]:
        return tuple(self.trajectory.manifest["meta"]["structure"]["protected"])

    def results(self) -> dict[str, Any] | None:
        """results.json, or None when the run has not finished."""
        return read_json(self.results_path) if self.results_path.is_file() else None

    def load_model(self, cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> LiveModel:
        """The dense model of the run, its structure (with the run's protected layers) and a mask applier."""
        cache = Path(cache_dir or self.config.get("cache_dir") or "~/.cache/gisp").expanduser()
        model, tokenizer = load_model_and_tokenizer(self.model_spec(trust_remote_code), cache)
        structure = describe(model, protected=self.protected)
        layers = layer_modules(model, family_spec(model.config.model_type))
        return LiveModel(model, tokenizer, structure, layers, MaskApplier(layers, structure))

    def step_of(self, target: float | None = None, step: int | None = None, tolerance: float = 0.0) -> int:
        """The trajectory step of a level: `step=N`, or `target=t` (the step that landed on t, else the closest step
        within `tolerance`). Fails naming the levels the trajectory has."""
        traj = self.trajectory
        if (target is None) == (step is None):
            raise GispError("give exactly one of target=0.4 (a sparsity level) or step=N")
        if step is not None:
            traj.step_record(step)  # a clear error for a step the trajectory does not have
            return int(step)
        landed = traj.manifest.get("targets", {})
        if target_key(target) in landed:
            return int(landed[target_key(target)])
        best = min(traj.steps, key=lambda r: abs(r["sparsity"] - target), default=None)
        if best is None or abs(best["sparsity"] - target) > tolerance:
            have = ", ".join(f"step {r['step']}: {r['sparsity']:.4f}" for r in traj.steps)
            raise GispError(
                f"sparsity {target} is not a level of this trajectory ({self.path}, within tolerance={tolerance}); "
                f"it has {have or 'no steps'}. Pick one of those, raise tolerance=..., or prune to it with gisp.run "
                f"(sparsity=[...,{target}])"
            )
        return int(best["step"])

    def level(self, target: float | None = None, step: int | None = None, tolerance: float = 0.0) -> Level:
        k = self.step_of(target, step, tolerance)
        traj = self.trajectory
        return Level(k, traj.step_record(k), traj.masks_at(k), traj.bias_at(k))
