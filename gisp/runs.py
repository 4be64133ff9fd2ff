"""A run dir as an object: the one way to reopen a run (config, trajectory, results, model, levels).

    run = RunDir("outputs/smollm2_135m/2026-11-22_18-00-00")
    live = run.load_model()                 # model, tokenizer, structure, mask applier (dense)
    level = run.level(target=0.37)          # any sparsity the trajectory reaches (exact read-out), or step=7
    live.set_level(level)

`gisp.evaluate`, `gisp.export`, the experiments scripts and the notebook reopen runs through it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from gisp.errors import GispError
from gisp.io import FileLock, read_json
from gisp.models.families import family_spec
from gisp.models.loading import ModelSpec, load_model_and_tokenizer
from gisp.models.structure import LayerModules, ModelStructure, describe, layer_modules
from gisp.prune.levels import Level, read_level
from gisp.prune.masks import MaskApplier, Masks, OutputBias, n_pruned, sparsity
from gisp.prune.methods import PrunerSpec, pruner_spec
from gisp.prune.trajectory import Trajectory, target_key


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
        """The run's trajectory in the store (named by trajectory.json, written when the run started)."""
        pointer = self.path / "trajectory.json"
        if not pointer.is_file():
            if (self.path / "trajectory" / "manifest.json").is_file():
                raise GispError(f"{self.path} was made by gisp 0.1 (trajectory inside the run dir, steps capped at "
                                "the targets): run the same command with this gisp to compute it in the store")
            raise GispError(f"no {pointer}: is {self.path} a gisp run dir (did gisp.run get past its checks)?")
        return Trajectory.load(read_json(pointer)["path"])

    @cached_property
    def structure(self) -> ModelStructure:
        """The model's structure as the trajectory recorded it (no model needed)."""
        meta = dict(self.trajectory.manifest["meta"]["structure"])
        meta["protected"] = tuple(meta["protected"])
        return ModelStructure(**meta)

    @cached_property
    def pruner(self) -> PrunerSpec:
        return pruner_spec(self.trajectory.manifest["definition"]["pruner"])

    @property
    def protected(self) -> tuple[int, ...]:
        return self.structure.protected

    def results(self) -> dict[str, Any] | None:
        """results.json, or None when the run has not finished."""
        return read_json(self.results_path) if self.results_path.is_file() else None

    def load_model(self, cache_dir: str | Path | None = None, trust_remote_code: bool = False) -> LiveModel:
        """The dense model of the run, its structure (with the run's protected layers) and a mask applier."""
        cache = Path(cache_dir or self.config.get("cache_dir") or "~/.cache/gisp").expanduser()
        model, tokenizer = load_model_and_tokenizer(self.model_spec(trust_remote_code), cache)
        gqa_mode = (self.config.get("prune") or {}).get("gqa_mode") or "query"
        structure = describe(model, protected=self.protected, gqa_mode=gqa_mode)
        layers = layer_modules(model, family_spec(model.config.model_type))
        return LiveModel(model, tokenizer, structure, layers, MaskApplier(layers, structure))

    def saved_level(self, target: float) -> Path | None:
        """levels/level_<t>.safetensors when this level was evaluated or exported before."""
        saved = self.path / "levels" / f"level_{target_key(target)}.safetensors"
        return saved if saved.is_file() else None

    def level(self, target: float | None = None, step: int | None = None, live: LiveModel | None = None) -> Level:
        """A level of the run: `target=t` (its saved masks under levels/, else an exact read-out of the trajectory)
        or `step=N` (the masks after step N of an iterative trajectory). FLAP levels not saved yet need `live`."""
        if (target is None) == (step is None):
            raise GispError("give exactly one of target=0.4 (a sparsity level) or step=N")
        traj = self.trajectory
        if step is not None:
            masks = traj.masks_at(step)
            level = float(traj.step_record(step)["sparsity"])
            return Level(level, masks, level, int(step), None,
                         structural_ratio=n_pruned(masks, self.structure) / self.structure.n_structures)
        saved = self.saved_level(target)
        if saved is not None:
            masks = Masks.load(saved)
            bias_file = saved.with_name(f"level_{target_key(target)}.bias.safetensors")
            bias = OutputBias.load(bias_file) if bias_file.is_file() else None
            entry = ((self.results() or {}).get("targets") or {}).get(target_key(target)) or {}
            return Level(target, masks, sparsity(masks, self.structure), int(entry.get("step", 0)),
                         entry.get("prefix"), bias,
                         structural_ratio=n_pruned(masks, self.structure) / self.structure.n_structures)
        return read_level(traj, self.pruner, self.structure, live.layers if live else None, target)


@contextmanager
def claim(run_dir: str | Path, command: str = "gisp") -> Iterator[Path]:
    """Hold a run dir for one command: an exclusive lock taken before anything is written (a second command on the
    same run dir is refused at once, naming who holds it), released on exit, on signals and when the process dies.
    When the block fails with a GispError, the run dir is left as it was found: a run dir or lock file this claim
    created is removed again."""
    run_dir = Path(run_dir)
    created_dir = not run_dir.exists()
    lock_path = run_dir / ".gisp.lock"
    created_lock = not lock_path.exists()  # the lock file is created once and never written (see FileLock)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, what=f"run dir {run_dir}")
    if not lock.acquire(blocking=False):
        h = lock.holder()
        raise GispError(f"{run_dir} is in use by another gisp command (pid {h.get('pid', '?')} on {h.get('host', '?')} "
                        f"since {h.get('since', '?')}): wait for it to finish, or choose another run dir "
                        "(hydra.run.dir=...)")
    try:
        yield run_dir
    except GispError:
        lock.release()
        if created_lock:
            lock_path.unlink(missing_ok=True)
        if created_dir and not any(run_dir.iterdir()):
            run_dir.rmdir()
        raise
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------------------
# results.json is a merge: levels and metrics added by later commands survive, and every metric remembers the
# evaluation protocol (windows, context, tasks, limits) it was computed with, so values of different protocols are
# never presented as one.


def protocol(description: Any) -> Any:
    """An evaluation task's description without what is only known after evaluating (items evaluated)."""
    if isinstance(description, dict):
        return {k: protocol(v) for k, v in description.items() if k not in ("n_evaluated",)}
    return description


def protocol_hash(description: Any) -> str:
    return hashlib.sha256(json.dumps(protocol(description), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _levels(results: dict) -> dict[str, dict]:
    return {"dense": results.setdefault("dense", {}), **results.setdefault("targets", {})}


def check_protocols(results: dict, descriptions: dict[str, dict], evaluating: list[str], run_dir: Path) -> None:
    """Refuse to record a task under a new protocol while levels that this command does not re-evaluate keep the
    task's values of the old one (they would be presented as one series)."""
    recorded = results.get("evaluation") or {}
    for task, description in descriptions.items():
        new = protocol_hash(description)
        stale = sorted(key for key, entry in _levels(results).items() if key not in evaluating
                       and (entry.get("evaluated") or {}).get(task) not in (None, new))
        if stale:
            old = protocol(recorded.get(task) or {})
            changed = sorted(k for k in set(old) | set(protocol(description))
                             if old.get(k) != protocol(description).get(k))
            raise GispError(
                f"{run_dir / 'results.json'} holds {task} of levels {stale} measured with other settings ("
                f"{', '.join(changed) or 'another protocol'} differ); metrics of different protocols are never "
                f"mixed. Evaluate with the recorded settings, or re-evaluate every level with the new ones "
                f"(gisp.evaluate run_dir={run_dir} targets=[{', '.join(k for k in stale if k != 'dense')}] ...)")


def needs_evaluation(entry: dict, descriptions: dict[str, dict]) -> bool:
    done = entry.get("evaluated") or {}
    return any(done.get(task) != protocol_hash(d) for task, d in descriptions.items())


def record_metrics(results: dict, entry: dict, metrics: dict, descriptions: dict[str, dict]) -> None:
    """Merge a level's new metrics, remember each task's protocol for the level and in results["evaluation"]."""
    entry.setdefault("metrics", {}).update(metrics)
    entry.setdefault("evaluated", {}).update({task: protocol_hash(d) for task, d in descriptions.items()})
    results.setdefault("evaluation", {}).update(descriptions)
