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
from gisp.io import FolderLock, atomic_file, file_sha256, read_json, write_json_atomic
from gisp.models.structure import ModelStructure
from gisp.prune.masks import Masks, n_pruned, sparsity

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


def _load_tensors(path: Path, directory: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise GispError(f"{path} is missing: the trajectory is incomplete; delete {directory.resolve()} to compute "
                        "it again") from None
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types for truncated / corrupt files)
        raise GispError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); the trajectory is "
                        f"damaged: delete {directory.resolve()} to compute it again") from None


# What each kind of step record must hold (a hand-edited or damaged manifest is refused, naming the field)
MASK_STEP_FIELDS = {"step": int, "sparsity": float, "structural_ratio": float, "heads_kept": int,
                    "channels_kept": int, "masks": str, "order": str}
SCORE_STEP_FIELDS = {"step": int, "sparsity": float, "scores": str}
# A level computed on its own (a method whose levels are not nested, SlimGPT): its target, masks and new weights
LEVEL_STEP_FIELDS = {"step": int, "target": float, "sparsity": float, "structural_ratio": float, "heads_kept": int,
                     "channels_kept": int, "masks": str, "weights": str}
STEP_FIELDS = {"scores": SCORE_STEP_FIELDS, "level": LEVEL_STEP_FIELDS}
FILE_KINDS = ("masks", "order", "scores", "weights")


def check_steps(path: Path, steps: Any) -> None:
    """The manifest's step records: numbered 1, 2, ..., every field present, of its type and not null."""
    if not isinstance(steps, list):
        raise GispError(f"{path}: `steps` is not a list: the manifest is damaged; delete {path.parent.resolve()} to "
                        "compute the trajectory again")
    for number, record in enumerate(steps, 1):
        if not isinstance(record, dict):
            raise GispError(f"{path}: step record {number} is not an object; delete {path.parent.resolve()} to "
                            "compute the trajectory again")
        fields = STEP_FIELDS.get(record.get("kind"), MASK_STEP_FIELDS)
        for field, kind in fields.items():
            value = record.get(field)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
                isinstance(value, kind) and not isinstance(value, bool)
            if not ok:
                raise GispError(f"{path}: step {record.get('step', number)} has {field}={value!r}, not a "
                                f"{kind.__name__}: the manifest is damaged or hand-edited; delete "
                                f"{path.parent.resolve()} to compute the trajectory again")
        if record["step"] != number:
            raise GispError(f"{path}: step record {number} is numbered {record['step']}: the manifest is damaged; "
                            f"delete {path.parent.resolve()} to compute the trajectory again")


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
        manifest = read_json(path, fix=f"delete {directory} to compute the trajectory again")
        if manifest.get("format") != FORMAT:
            raise GispError(f"{path} is not a gisp trajectory manifest")
        if manifest.get("version") != VERSION:
            raise GispError(f"{path} was written by another gisp trajectory format (version "
                            f"{manifest.get('version')}, this gisp reads {VERSION}); run the job again to compute it "
                            "in this format (a new store entry), or use the gisp release that wrote it")
        check_steps(path, manifest.get("steps"))
        return cls(directory, manifest)

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.manifest["steps"]

    @property
    def last_step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    @property
    def reached(self) -> float:
        """The highest sparsity the trajectory can read out (0 before the first step; of a trajectory of separate
        levels, its highest level)."""
        if not self.steps:
            return 0.0
        if self.steps[-1].get("kind") == "level":
            return max(float(s["sparsity"]) for s in self.steps)
        return float(self.steps[-1].get("max_sparsity", self.steps[-1]["sparsity"]))

    def level_step(self, target: float) -> dict[str, Any] | None:
        """The record of the separately computed level at `target` (kind "level"), None when it was not computed."""
        key = target_key(target)
        for s in self.steps:
            if s.get("kind") == "level" and target_key(s["target"]) == key:
                return s
        return None

    def separate_levels(self) -> list[float]:
        """The targets of the separately computed levels (kind "level"), in ascending order."""
        return sorted(float(s["target"]) for s in self.steps if s.get("kind") == "level")

    def step_record(self, step: int) -> dict[str, Any]:
        for s in self.steps:
            if s["step"] == step:
                return s
        raise GispError(f"step {step} is not in {self.path} (steps 1..{self.last_step})")

    def add_step(self, step: int, record: dict[str, Any], masks: Masks | None = None,
                 order: torch.Tensor | None = None, tensors: dict[str, torch.Tensor] | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
        """Snapshot one step: its files first (masks, order of pruning, scores, a separate level's new weights), then
        the manifest naming them."""
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
        if weights is not None:
            files["weights"] = f"step_{step:04d}.weights.safetensors"
            _save_tensors(self.directory / files["weights"], {k: v.contiguous() for k, v in weights.items()},
                          "gisp-weights")
        checksums = {kind: file_sha256(self.directory / name, cached=False) for kind, name in files.items()}
        self.steps.append({"step": step, **record, **files, "sha256": checksums})
        self.write()

    def _verified(self, step: int, kind: str) -> Path:
        """The path of a step's file, after checking it is the file the step wrote (sha256 in the manifest)."""
        record = self.step_record(step)
        if kind not in record:
            raise GispError(f"step {step} of {self.path} has no {kind} file")
        name = record[kind]
        folder = self.directory.resolve()
        # a file name of the manifest is a plain name in the trajectory's own folder: never read from elsewhere
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
                or (folder / name).resolve().parent != folder:
            raise GispError(f"{self.path}: step {step} names its {kind} file {name!r}, which is not a file of the "
                            f"trajectory's folder {folder}: the manifest is damaged or hand-edited; delete {folder} "
                            "to compute the trajectory again")
        path = self.directory / name
        if not path.is_file():
            raise GispError(f"{path} is missing: the trajectory is incomplete; delete {folder} to compute it again")
        expected = (record.get("sha256") or {}).get(kind)
        if expected and file_sha256(path, cached=False) != expected:
            raise GispError(f"{path} changed since step {step} wrote it (sha256 differs from the manifest): a damaged "
                            f"or hand-edited file; delete {folder} to compute the trajectory again")
        return path

    def verify(self, structure: ModelStructure | None = None) -> None:
        """Every step's files are intact, the steps' masks are nested (a structure pruned once stays pruned) and each
        record says what its masks hold (sparsity, kept heads and channels: a hand-edited record would make levels
        land elsewhere than they claim). `structure`: the model's (default: the one the manifest recorded)."""
        structure = structure or self.structure
        previous = None
        for record in self.steps:
            for kind in FILE_KINDS:
                if kind in record:
                    self._verified(record["step"], kind)
            if "masks" in record:
                masks = self.masks_at(record["step"])
                if record.get("kind") == "level":  # a level computed on its own: not nested in the others
                    self._check_record(record, masks, structure)
                    continue
                if previous is not None and not masks.is_nested_in(previous):
                    raise GispError(f"step {record['step']} of {self.path} un-prunes structures of the step before: "
                                    f"its masks are not nested; delete {self.directory.resolve()} to compute it again")
                self._check_record(record, masks, structure)
                previous = masks

    def _check_record(self, record: dict[str, Any], masks: Masks, structure: ModelStructure) -> None:
        if masks.heads.shape != (structure.n_layers, structure.n_heads) or \
                masks.channels.shape != (structure.n_layers, structure.ffn):
            raise GispError(f"{self.directory / record['masks']} holds masks of another model shape than the "
                            f"trajectory's model; delete {self.directory.resolve()} to compute it again")
        measured = {"sparsity": sparsity(masks, structure), "heads_kept": int(masks.heads.sum()),
                    "channels_kept": int(masks.channels.sum()),
                    "structural_ratio": n_pruned(masks, structure) / structure.n_structures}
        wrong = [f"{k}={record[k]} (its masks: {v:.6g})" for k, v in measured.items() if abs(record[k] - v) > 1e-9]
        if wrong:
            raise GispError(f"{self.path}: step {record['step']} records {', '.join(wrong)}: the manifest was edited "
                            f"or damaged; delete {self.directory.resolve()} to compute the trajectory again")

    @property
    def structure(self) -> ModelStructure:
        """The model's structure as the manifest recorded it (no model needed)."""
        try:
            meta = dict(self.manifest["meta"]["structure"])
            meta["protected"] = tuple(meta["protected"])
            return ModelStructure(**meta)
        except (KeyError, TypeError) as e:
            raise GispError(f"{self.path}: its model structure (meta.structure) is damaged ({e}); delete "
                            f"{self.directory.resolve()} to compute the trajectory again") from None

    def masks_at(self, step: int) -> Masks:
        if "masks" not in self.step_record(step):
            raise GispError(f"step {step} of {self.path} stores scores, not masks: read a level instead")
        return Masks.load(self._verified(step, "masks"))

    def order_at(self, step: int) -> torch.Tensor:
        """Flat indices (heads first, then channels) of the structures step `step` pruned, in pruning order."""
        return _load_tensors(self._verified(step, "order"), self.directory)["order"]

    def scores_at(self, step: int) -> dict[str, torch.Tensor]:
        return _load_tensors(self._verified(step, "scores"), self.directory)

    def weights_at(self, step: int) -> dict[str, torch.Tensor]:
        """A separately computed level's new kept columns of o_proj ("attn.{i}") and down_proj ("mlp.{i}")."""
        return _load_tensors(self._verified(step, "weights"), self.directory)

    def write(self) -> None:
        write_json_atomic(self.path, self.manifest)


class TrajectoryStore:
    """Folder of trajectories, one subfolder per id (default `outputs/trajectories`, setting `store_dir`)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path_of(self, tid: str) -> Path:
        return self.root / tid

    def lock(self, tid: str, what: str = "") -> FolderLock:
        """The exclusive lock of trajectory `tid`, on its folder (a context manager that waits, logging who holds
        it)."""
        return FolderLock(self.path_of(tid), what=what or f"trajectory {tid}")

    def open(self, definition: dict[str, Any], meta: dict[str, Any]) -> Trajectory:
        """The trajectory of `definition`: the stored one (any length) or a new, empty one. Call under lock()."""
        tid = trajectory_id(definition)
        directory = self.path_of(tid)
        for stale in directory.glob(".*.tmp"):  # left by a killed writer; we hold the lock, nobody writes now
            stale.unlink(missing_ok=True)
        if (directory / "manifest.json").is_file():
            traj = Trajectory.load(directory)
            if traj.manifest.get("definition") != json.loads(json.dumps(definition, default=str)):
                raise GispError(f"{traj.path} has id {tid} but another definition: the store is damaged; delete "
                                f"{directory}")
            traj.verify()  # before extending it: intact files, nested steps
            return traj
        return Trajectory.new(directory, tid, definition, meta)
