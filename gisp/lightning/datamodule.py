"""The calibration data module: every process gets its own exact shard of the calibration set."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Sampler

from gisp.data.calibration import CalibrationSet, SequenceDataset, pad_collate
from gisp.errors import GispError


class ShardSampler(Sampler[int]):
    """Strided shard rank::world_size without padding: the shards partition the set exactly (DistributedSampler
    pads with repeated samples, which would bias the mean gradient)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class CalibrationData(L.LightningDataModule):
    """Serves the calibration set; each process gets its own shard (ranks are known only after launch)."""

    def __init__(self, calib: CalibrationSet, batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise GispError(f"data.batch_size must be >= 1, got {batch_size}")
        self.dataset = SequenceDataset(calib)
        self.collate = pad_collate(calib.pad_id)
        self.batch_size = batch_size

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(self.dataset) < world:
            raise GispError(f"{len(self.dataset)} calibration samples cannot be split over {world} processes")
        sampler = ShardSampler(len(self.dataset), rank, world)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)
