"""Reconstructed levels in the store, content-addressed like trajectories: a level's reconstruction is defined by the
trajectory, the level (its masks), the reconstruction's settings and its data's content hash, and every job and
command that needs the same one (a sweep over evaluation settings, a second gisp.evaluate, gisp.export) reuses it.

    <store_dir>/reconstructions/<id>/manifest.json          its definition, record (time, tokens) and the sha256 of
    <store_dir>/reconstructions/<id>/level.safetensors      the new weights and biases (gisp.reconstruct.build)

One job computes a reconstruction at a time (the folder's lock); the files are written atomically and checked
against their sha256 when read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gisp.errors import GispError
from gisp.io import FolderLock, file_sha256, read_json, write_json_atomic
from gisp.reconstruct.build import Reconstruction

log = logging.getLogger(__name__)

FOLDER = "reconstructions"
VERSION = 1


def reconstruction_id(definition: dict[str, Any]) -> str:
    payload = json.dumps({"definition": definition, "format": "gisp-reconstruction", "version": VERSION},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class ReconstructionStore:
    def __init__(self, store_dir: str | Path):
        self.root = Path(store_dir).expanduser() / FOLDER

    def folder(self, definition: dict[str, Any]) -> Path:
        return self.root / reconstruction_id(definition)

    def load(self, definition: dict[str, Any]) -> Reconstruction | None:
        """The stored reconstruction of `definition`, checked (None when there is none yet)."""
        folder = self.folder(definition)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            return None
        manifest = read_json(manifest_path, fix=f"delete {folder} to compute the reconstruction again")
        plain = json.loads(json.dumps(definition, default=str))
        weights = folder / "level.safetensors"
        if manifest.get("definition") != plain or not weights.is_file():
            raise GispError(f"{folder} does not hold the reconstruction its name says (edited or damaged): delete it "
                            "to compute it again")
        if file_sha256(weights, cached=False) != manifest.get("sha256"):
            raise GispError(f"{weights} changed since it was written (sha256 differs from its manifest): delete "
                            f"{folder} to compute the reconstruction again")
        return Reconstruction.load(weights, manifest.get("record"))

    def get_or_compute(self, definition: dict[str, Any], compute: Callable[[], Reconstruction]) -> Reconstruction:
        """The stored reconstruction, or `compute()` stored (under the folder's lock: one job computes, the others
        wait and reuse)."""
        found = self.load(definition)
        if found is not None:
            log.info("reconstruction %s reused from the store", reconstruction_id(definition))
            return found
        folder = self.folder(definition)
        with FolderLock(folder, what=f"reconstruction {folder.name}"):
            found = self.load(definition)  # another job may have written it while we waited
            if found is not None:
                return found
            made = compute()
            made.save(folder / "level.safetensors")
            write_json_atomic(folder / "manifest.json", {
                "format": "gisp-reconstruction", "version": VERSION, "definition": definition,
                "record": made.record, "sha256": file_sha256(folder / "level.safetensors", cached=False)})
            made.record = {**made.record, "computed": True}
            return made
