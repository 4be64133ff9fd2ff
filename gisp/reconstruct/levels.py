"""Levels as reconstructed models: the one place a level gets its reconstruction, for gisp.run, gisp.evaluate,
gisp.export and gisp.recover alike.

    reconstructor = Reconstructor(settings, recipe, tokenizer, data_dir, store_dir, trajectory_id, live pieces)
    level = reconstructor.level(level)      # from the store, or computed (and stored) once

A reconstructed level keeps its masks (the trajectory's: levels stay nested and shared) and gets the
reconstruction's output bias (in place of FLAP's) and new kept columns (`Level.weights`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gisp.memory.reconstruction import reconstruction_plan
from gisp.models.structure import LayerModules, ModelStructure
from gisp.prune.levels import Level
from gisp.prune.masks import Masks
from gisp.prune.trajectory import target_key
from gisp.reconstruct.build import Reconstruction, reconstruct, reconstruction_batches
from gisp.reconstruct.settings import ReconstructSettings
from gisp.reconstruct.store import ReconstructionStore, reconstruction_id

log = logging.getLogger(__name__)

NONE = {"method": "none"}


def masks_sha256(masks: Masks) -> str:
    h = hashlib.sha256()
    h.update(masks.heads.to(torch.uint8).numpy().tobytes())
    h.update(masks.channels.to(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Reconstructor:
    """Reconstructs the levels of one run: the data built once, each level read from the store or computed there."""

    def __init__(self, settings: ReconstructSettings, recipe, tokenizer, data_dir: Path | None, store_dir: Path,
                 trajectory_id: str, model: nn.Module, layers: list[LayerModules], structure: ModelStructure):
        self.settings, self.recipe, self.tokenizer, self.data_dir = settings, recipe, tokenizer, data_dir
        self.store = ReconstructionStore(store_dir)
        self.trajectory_id = trajectory_id
        self.model, self.layers, self.structure = model, layers, structure
        self._data: tuple[list[dict], dict] | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def data(self) -> tuple[list[dict], dict]:
        if self._data is None:
            device = next(self.model.parameters()).device
            self._data = reconstruction_batches(self.recipe, self.tokenizer, self.data_dir, self.settings, device)
        return self._data

    def definition(self) -> dict[str, Any]:
        """What defines this run's reconstructions (the settings and the data's record); NONE without one."""
        if not self.settings.enabled:
            return dict(NONE)
        return self.settings.definition(self.data()[1])

    def plan(self) -> dict[str, Any] | None:
        """The memory plan of one level's reconstruction (gisp.memory.reconstruction), None without one."""
        if not self.enabled:
            return None
        first = next(self.model.parameters())
        params = sum(p.numel() for p in self.model.parameters())
        s = self.settings
        return reconstruction_plan(self.structure, params, first.element_size(), s.tokens, s.batch_size * s.seq_len,
                                   s.method, s.target)

    def level(self, level: Level) -> Level:
        """`level` reconstructed (the level itself without a reconstruction)."""
        if not self.settings.enabled:
            return level
        definition = {"trajectory": self.trajectory_id, "level": {"target": target_key(level.target),
                                                                  "masks_sha256": masks_sha256(level.masks)},
                      "reconstruction": self.definition()}

        def compute() -> Reconstruction:
            log.info("reconstructing level %s (%s, %d tokens)", target_key(level.target), self.settings.method,
                     self.data()[1]["tokens"])
            return reconstruct(self.model, self.layers, self.structure, level.masks, self.data()[0], self.settings)

        made = self.store.get_or_compute(definition, compute)
        record = {"id": reconstruction_id(definition), "method": self.settings.method,
                  "seconds": made.record.get("seconds"), "computed": bool(made.record.get("computed")),
                  "blocks_refitted": made.record.get("blocks_refitted")}
        return dataclasses.replace(level, bias=made.bias, weights=made.weights or None, reconstruction=record)
