"""A recovery on disk, under the run dir: `recovered/<name>/`.

    recovery.json            its definition (method, adapter, hyperparameters, seed, budget, training data and its
                             content sha256, trajectory), and per level: status, tokens, wall time, tokens/s, curve
    level_<t>/adapter/       lora / distill with recover.adapter=lora: the peft adapter of the level's compact model
    level_<t>/model.safetensors   recover.adapter=none: the recovered compact weights
    nested/adapter/ or nested/model.safetensors   nested: one adapter (or the full weights) on the dense model
    <level>/checkpoints/     Lightning's last.ckpt while a fit runs (removed once it is complete)
    <level>/csv/metrics.csv  the curves (train and validation loss, learning rate, tokens/s)

A recovered model is data replayed on the dense weights: the level's masks (the trajectory) + the adapter or the
weights, merged. `load_recovered` rebuilds it for gisp.evaluate and gisp.export.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gisp.errors import GispError
from gisp.io import atomic_dir, file_sha256, read_json, write_json_atomic
from gisp.prune.levels import Level
from gisp.prune.trajectory import target_key
from gisp.recovery.students import base_model, compact_student, merged

log = logging.getLogger(__name__)

FOLDER = "recovered"
NESTED = "nested"


class Recovery:
    def __init__(self, run_dir: str | Path, name: str):
        self.run_dir = Path(run_dir)
        self.name = name
        self.folder = self.run_dir / FOLDER / name

    @property
    def record_path(self) -> Path:
        return self.folder / "recovery.json"

    def record(self) -> dict[str, Any] | None:
        return read_json(self.record_path) if self.record_path.is_file() else None

    def check_inside(self) -> None:
        """The recovery's folder (and the run dir's recovered/) stays inside the run dir: gisp never reads or writes
        through a link that leads out of it."""
        root = self.run_dir.resolve()
        for path in (self.run_dir / FOLDER, self.folder, *(self.folder.glob("*") if self.folder.is_dir() else [])):
            if path.is_symlink() and root not in path.resolve().parents:
                raise GispError(f"{path} is a link to {path.resolve()}, outside the run dir: gisp never reads or "
                                f"writes through a link out of a run dir; remove the link (rm {path})")

    def require(self) -> dict[str, Any]:
        self.check_inside()
        record = self.record()
        if record is None:
            names = sorted(p.parent.name for p in (self.run_dir / FOLDER).glob("*/recovery.json")) if \
                (self.run_dir / FOLDER).is_dir() else []
            raise GispError(f"{self.run_dir} has no recovery named {self.name!r} (recovered: {names or 'none'}); run "
                            f"python -m gisp.recover run_dir={self.run_dir} recover=... first")
        return record

    def verify(self, key: str) -> None:
        """Refuse a level whose stored weights are gone or changed since training (before anything is measured)."""
        record = self.require()
        part = NESTED if record["definition"]["method"] == "nested" else key
        done = (record.get("levels") or {}).get(part) or {}
        problem = stored_problem(self.run_dir, done) if done.get("status") == "complete" else None
        if problem is not None:
            raise GispError(f"the recovery's trained weights cannot be used: {problem}. "
                            f"{_retrain(self, None if part == NESTED else key)}")

    def open(self, definition: dict[str, Any]) -> dict[str, Any]:
        """The recovery's record for `definition`: the stored one, or a new one. Another definition under the same
        name is refused (its weights would be mixed with these)."""
        self.check_inside()
        record = self.record()
        plain = json.loads(json.dumps(definition, default=str))
        if record is not None and record.get("definition") != plain:
            old = record.get("definition") or {}
            changed = sorted(k for k in set(old) | set(plain) if old.get(k) != plain.get(k))
            raise GispError(f"{self.folder} holds a recovery with another definition ({', '.join(changed)} differ): "
                            f"name this one differently (recover.name=...) or delete that folder")
        return record or {"name": self.name, "definition": plain, "levels": {}}

    def write(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.record_path, record)

    def part(self, key: str | None) -> Path:
        """The folder of one level's recovery (`key` None: the nested one)."""
        return self.folder / (NESTED if key is None else f"level_{key}")

    def checkpoints(self, key: str | None) -> Path:
        return self.part(key) / "checkpoints"

    def save(self, key: str | None, student: nn.Module, adapter: bool) -> tuple[str, str]:
        """Store what was trained (before merging): the peft adapter, or every weight; returns its path relative to
        the run dir and the sha256 of its weights file (results.json ties a recovered level's metrics to it)."""
        part = self.part(key)
        target = part / ("adapter" if adapter else "weights")
        if target.exists():
            shutil.rmtree(target)
        with atomic_dir(target) as tmp:
            if adapter:
                student.save_pretrained(str(tmp), safe_serialization=True)
            else:
                state = {k: v.detach().contiguous().cpu() for k, v in base_model(student).state_dict().items()}
                save_file(_untied(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(self.checkpoints(key), ignore_errors=True)  # complete: the fit's checkpoints are spent
        weights = target / ("adapter_model.safetensors" if adapter else "model.safetensors")
        return str(target.relative_to(self.run_dir)), file_sha256(weights, cached=False)


def stored_problem(run_dir: Path, entry: dict[str, Any]) -> str | None:
    """Why a complete level's stored weights cannot be used (missing, or changed since they were trained: their
    sha256 is recorded), or None when they are intact."""
    artefact = entry.get("artefact")
    if not artefact:
        return "no stored weights are recorded"
    folder = Path(run_dir) / artefact
    weights = next((folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file()),
                   None)
    if weights is None:
        return f"{folder} is missing"
    if entry.get("artefact_sha256") and file_sha256(weights, cached=False) != entry["artefact_sha256"]:
        return f"{weights} changed since it was trained (its sha256 differs from the recorded one)"
    return None


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one copy, the loader ties them again."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            continue
        seen[ptr] = k
        out[k] = v
    return out


def load_recovered(run_dir: str | Path, name: str, live, level: Level) -> nn.Module:
    """The recovered model of `level` (merged, in evaluation mode): the level's compact model for lora / distill; for
    nested, `live.model` itself with the recovery merged into it (once): the caller applies the level's masks, or
    slices it (`compact_model`). `live`: the run's dense model (gisp.runs.LiveModel)."""
    recovery = Recovery(run_dir, name)
    record = recovery.require()
    definition = record["definition"]
    method, adapter = definition["method"], definition["adapter"] == "lora"
    key = target_key(level.target)
    if method == "nested":
        if key not in [target_key(t) for t in definition["levels"]]:
            raise GispError(f"the nested recovery {name!r} of {run_dir} trained levels {definition['levels']}, not "
                            f"{key}")
        _recovered_dense(recovery, live, adapter)
        return live.model  # the recovered dense weights: the caller applies the level's masks (live.set_level)
    done = (record.get("levels") or {}).get(key) or {}
    if done.get("status") != "complete":
        raise GispError(f"level {key} of the recovery {name!r} in {run_dir} is not complete: run gisp.recover with "
                        f"run_dir={run_dir} sparsity=[{key}] and that recovery's settings to finish it")
    student = compact_student(live.model, level.masks, live.structure, level.bias, own_weights=not adapter,
                              weights=level.weights)
    return _with_trained(student, recovery.run_dir, done, adapter, _retrain(recovery, key))


def _retrain(recovery: Recovery, key: str | None) -> str:
    """The fix for stored weights that are gone or changed: the same recovery command trains them again."""
    level = f"sparsity=[{key}] " if key is not None else ""
    return (f"Run the recovery again with its settings (python -m gisp.recover run_dir={recovery.run_dir} {level}"
            f"recover.name={recovery.name} ...: recovered/{recovery.name}/recovery.json holds them): it trains that "
            "level again")


@contextmanager
def recovered_model(run_dir: str | Path, name: str, live, level: Level, model: nn.Module | None = None
                    ) -> Iterator[nn.Module]:
    """The recovered level as a model while the block runs: `model` (just trained) or the stored recovery merged; a
    nested recovery is the recovered dense weights under the level's masks, removed again afterwards."""
    model = model if model is not None else load_recovered(run_dir, name, live, level)
    shared = model is live.model
    if shared:
        live.set_level(level)
    try:
        yield model
    finally:
        if shared:
            live.set_level(None)


def compact_model(run_dir: str | Path, name: str, live, level: Level) -> nn.Module:
    """The recovered level as a physically smaller model (what gisp.export writes), for any recovery method."""
    model = load_recovered(run_dir, name, live, level)
    if model is live.model:
        return compact_student(live.model, level.masks, live.structure, level.bias, weights=level.weights).eval()
    return model


def _with_trained(model: nn.Module, run_dir: Path, done: dict[str, Any], adapter: bool, fix: str) -> nn.Module:
    problem = stored_problem(run_dir, done)
    if problem is not None:
        raise GispError(f"the recovery's trained weights cannot be used: {problem}. {fix}")
    artefact = Path(run_dir) / done["artefact"]
    if adapter:
        from peft import PeftModel

        return merged(PeftModel.from_pretrained(model, str(artefact)))
    state = load_file(str(artefact / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if not m.endswith("lm_head.weight")]:
        raise GispError(f"{artefact} does not fit this level's model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}): it belongs to another recovery")
    return model.eval()


def _recovered_dense(recovery: Recovery, live, adapter: bool) -> None:
    if live.recovered == recovery.name:
        return
    if live.recovered is not None:  # another nested recovery is merged into the weights: start from the dense ones
        live.reload_dense()
    record = recovery.require()
    done = (record.get("levels") or {}).get(NESTED) or {}
    if done.get("status") != "complete":
        raise GispError(f"the nested recovery {recovery.name!r} is not complete: run gisp.recover again to finish it")
    recovered = _with_trained(live.model, recovery.run_dir, done, adapter, _retrain(recovery, None))
    if recovered is not live.model:  # peft's merge returns the base model: the same object, now merged
        live.model = recovered
    live.recovered = recovery.name
