"""The pruning trajectory on disk: every step's masks (safetensors) and one JSON manifest.

"Prune once, deploy many": any step can be restored on the dense weights from its masks file. The manifest is
rewritten atomically after each step, so an interrupted run resumes from its last complete step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gisp.errors import GispError
from gisp.io import read_json, write_json_atomic
from gisp.prune.masks import Masks, OutputBias

FORMAT = "gisp-trajectory"


def target_key(target: float) -> str:
    """How a sparsity target is written as a JSON key: 0.4 -> "0.4"."""
    return f"{target:g}"


class Trajectory:
    """Manifest + masks files under `directory` (normally RUN_DIR/trajectory)."""

    def __init__(self, directory: str | Path, fingerprint: str, meta: dict[str, Any]):
        self.directory = Path(directory)
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "version": 1,
            "fingerprint": fingerprint,
            "meta": meta,
            "complete": False,
            "dense": {"metrics": None},
            "targets": {},
            "steps": [],
        }

    @property
    def path(self) -> Path:
        return self.directory / "manifest.json"

    @classmethod
    def open(cls, directory: str | Path, fingerprint: str, meta: dict[str, Any], resume: bool = True) -> Trajectory:
        """A fresh trajectory, or the one already in `directory` when it was made by the same configuration."""
        traj = cls(directory, fingerprint, meta)
        if traj.path.exists():
            if not resume:
                raise GispError(f"{traj.path} exists and resume=false: choose a new run dir (hydra.run.dir=...)")
            found = read_json(traj.path)
            if found.get("format") != FORMAT:
                raise GispError(f"{traj.path} is not a gisp trajectory manifest")
            if found.get("fingerprint") != fingerprint:
                raise GispError(
                    f"{traj.directory.parent} holds a trajectory made with a different configuration; "
                    "resume it with the same overrides, or start a new run dir (hydra.run.dir=...)"
                )
            traj.manifest = found
        return traj

    @classmethod
    def load(cls, directory: str | Path) -> Trajectory:
        """Read a finished or partial trajectory (no configuration check): for evaluation and export."""
        path = Path(directory) / "manifest.json"
        if not path.exists():
            raise GispError(f"no trajectory manifest at {path}: is this a gisp run dir?")
        traj = cls(directory, "", {})
        traj.manifest = read_json(path)
        return traj

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.manifest["steps"]

    @property
    def last_step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    def add_step(self, step: int, masks: Masks, record: dict[str, Any], bias: OutputBias | None = None) -> None:
        """Snapshot one step: masks (and output bias) files first, then the manifest that points to them."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:04d}.safetensors"
        masks.save(self.directory / name)
        files = {"masks": name}
        if bias is not None:
            files["bias"] = f"step_{step:04d}.bias.safetensors"
            bias.save(self.directory / files["bias"])
        self.steps.append({"step": step, **record, **files})
        self.write()

    def step_record(self, step: int) -> dict[str, Any]:
        for s in self.steps:
            if s["step"] == step:
                return s
        raise GispError(f"step {step} is not in {self.path} (steps 1..{self.last_step})")

    def masks_at(self, step: int) -> Masks:
        return Masks.load(self.directory / self.step_record(step)["masks"])

    def bias_at(self, step: int) -> OutputBias | None:
        """The step's output bias (FLAP's compensation), or None for pure masks."""
        name = self.step_record(step).get("bias")
        return OutputBias.load(self.directory / name) if name else None

    def write(self) -> None:
        write_json_atomic(self.path, self.manifest)
