"""The pruning trajectory on disk, stored once per definition: a content-addressed store of manifests and masks.

"Prune once, deploy many": a trajectory depends only on what defines it (model, calibration data and its content
hash, objective, pruner, schedule, pruning settings, seed, format version), never on the sparsity targets of the
run that computes it. Every job whose definition is the same reuses it; a job that needs a higher sparsity
extends it. `TrajectoryStore.open(definition)` gives the trajectory under an exclusive file lock, so concurrent
jobs (parallel launchers, SLURM arrays) wait for each other instead of computing twice; a crashed holder's lock is
released by the operating system, and the next job resumes the trajectory from its last complete step.

Iterative steps store their masks and the ORDER in which they pruned their structures (`step_NNNN.order`), so a
level at any sparsity is read out exactly (gisp.prune.levels). One-shot methods store their scores (and FLAP's
input means) as a single step; their levels are cut from those scores by the method's ranking rule.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gisp.errors import GispError
from gisp.io import FileLock, atomic_file, read_json, write_json_atomic
from gisp.prune.masks import Masks

log = logging.getLogger(__name__)

FORMAT = "gisp-trajectory"
VERSION = 2  # 1: one trajectory per run dir, steps capped at the targets (gisp 0.1)


def target_key(target: float) -> str:
    """How a sparsity target is written as a JSON key: 0.4 -> "0.4"."""
    return f"{target:g}"


def trajectory_id(definition: dict[str, Any]) -> str:
    """Content address of a trajectory: a hash of its definition (sorted JSON) and the format version."""
    payload = json.dumps({"definition": definition, "format": FORMAT, "version": VERSION}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], fmt: str) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": f"{fmt}/1"})


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise GispError(f"{path} is missing: the trajectory in {path.parent} is incomplete; delete that folder "
                        "to compute it again") from None
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for truncated / corrupt files)
        raise GispError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); the trajectory in "
                        f"{path.parent} is damaged: delete that folder to compute it again") from None


class Trajectory:
    """Manifest + per-step files of one trajectory (a folder of the store)."""

    def __init__(self, directory: str | Path, manifest: dict[str, Any]):
        self.directory = Path(directory)
        self.manifest = manifest

    @property
    def path(self) -> Path:
        return self.directory / "manifest.json"

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @classmethod
    def new(cls, directory: Path, tid: str, definition: dict[str, Any], meta: dict[str, Any]) -> Trajectory:
        return cls(directory, {"format": FORMAT, "version": VERSION, "id": tid, "definition": definition,
                               "meta": meta, "steps": []})

    @classmethod
    def load(cls, directory: str | Path) -> Trajectory:
        """Read a trajectory (for evaluation and export); refuses another format version with the fix."""
        directory = Path(directory)
        path = directory / "manifest.json"
        if not path.is_file():
            raise GispError(f"no trajectory manifest at {path}: the trajectory was never started or was removed")
        try:
            manifest = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GispError(f"{path} is not valid JSON ({e}); delete {directory} to compute the trajectory again")
        if manifest.get("format") != FORMAT:
            raise GispError(f"{path} is not a gisp trajectory manifest")
        if manifest.get("version") != VERSION:
            raise GispError(f"{path} was written by another gisp trajectory format (version "
                            f"{manifest.get('version')}, this gisp reads {VERSION}); run the job again to compute it "
                            "in this format (a new store entry), or use the gisp release that wrote it")
        return cls(directory, manifest)

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.manifest["steps"]

    @property
    def last_step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    @property
    def reached(self) -> float:
        """The highest sparsity the trajectory can read out (0 before the first step)."""
        if not self.steps:
            return 0.0
        return float(self.steps[-1].get("max_sparsity", self.steps[-1]["sparsity"]))

    def step_record(self, step: int) -> dict[str, Any]:
        for s in self.steps:
            if s["step"] == step:
                return s
        raise GispError(f"step {step} is not in {self.path} (steps 1..{self.last_step})")

    def add_step(self, step: int, record: dict[str, Any], masks: Masks | None = None,
                 order: torch.Tensor | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Snapshot one step: its files first (masks, order of pruning, scores), then the manifest naming them."""
        self.directory.mkdir(parents=True, exist_ok=True)
        files = {}
        if masks is not None:
            files["masks"] = f"step_{step:04d}.safetensors"
            masks.save(self.directory / files["masks"])
        if order is not None:
            files["order"] = f"step_{step:04d}.order.safetensors"
            _save_tensors(self.directory / files["order"], {"order": order.to(torch.int64)}, "gisp-order")
        if tensors:
            files["scores"] = f"step_{step:04d}.scores.safetensors"
            _save_tensors(self.directory / files["scores"], tensors, "gisp-scores")
        self.steps.append({"step": step, **record, **files})
        self.write()

    def masks_at(self, step: int) -> Masks:
        name = self.step_record(step).get("masks")
        if name is None:
            raise GispError(f"step {step} of {self.path} stores scores, not masks: read a level instead")
        path = self.directory / name
        if not path.is_file():
            _load_tensors(path)  # the error that names the file and the fix
        return Masks.load(path)

    def order_at(self, step: int) -> torch.Tensor:
        """Flat indices (heads first, then channels) of the structures step `step` pruned, in pruning order."""
        return _load_tensors(self.directory / self.step_record(step)["order"])["order"]

    def scores_at(self, step: int) -> dict[str, torch.Tensor]:
        return _load_tensors(self.directory / self.step_record(step)["scores"])

    def write(self) -> None:
        write_json_atomic(self.path, self.manifest)


class TrajectoryStore:
    """Folder of trajectories, one subfolder per id (default `outputs/trajectories`, setting `store_dir`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path_of(self, tid: str) -> Path:
        return self.root / tid

    def lock(self, tid: str, what: str = "") -> FileLock:
        """The exclusive lock of trajectory `tid` (a context manager that waits, logging who holds it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / f"{tid}.lock", what=what or f"trajectory {tid}")

    def open(self, definition: dict[str, Any], meta: dict[str, Any]) -> Trajectory:
        """The trajectory of `definition`: the stored one (any length) or a new, empty one. Call under lock()."""
        tid = trajectory_id(definition)
        directory = self.path_of(tid)
        if (directory / "manifest.json").is_file():
            traj = Trajectory.load(directory)
            if traj.manifest.get("definition") != json.loads(json.dumps(definition, default=str)):
                raise GispError(f"{traj.path} has id {tid} but another definition: the store is damaged; delete "
                                f"{directory}")
            return traj
        return Trajectory.new(directory, tid, definition, meta)
