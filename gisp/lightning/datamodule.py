"""The calibration data module: every process gets its own exact shard of the calibration set.

Under DDP each process runs its own number of batches (gradients are all-reduced once, at the end). Under FSDP
(`trainer=fsdp`) every forward and backward is a collective, so every process must run the SAME number of batches:
a shorter shard is topped up with padding items (a copy of a real sequence with weight 0, marked `real=False`),
which add nothing to the gradient, the loss or the sequence count.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gisp.data.calibration import CalibrationSet, SequenceDataset, pad_collate
from gisp.errors import GispError
from gisp.lightning.sharding import is_sharded


class ShardSampler(Sampler[int]):
    """Strided shard rank::world_size without padding: the shards partition the set exactly (DistributedSampler
    pads with repeated samples, which would bias the mean gradient). With `equal_batches=b`, the fewest indices >= n
    (padding items of `PaddedDataset`) are appended so that every rank has ceil(ceil(n / world) / b) batches."""

    def __init__(self, n: int, rank: int, world_size: int, equal_batches: int | None = None):
        self.indices = list(range(rank, n, world_size))
        if equal_batches:
            batches = math.ceil(math.ceil(n / world_size) / equal_batches)
            missing = max((batches - 1) * equal_batches + 1 - len(self.indices), 0)
            self.indices += [n + k for k in range(missing)]  # the fewest padding items that give `batches` batches

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class PaddedDataset(Dataset):
    """The calibration items, plus padding items at indices >= n: item (i - n) % n with weight 0, `real` False."""

    def __init__(self, dataset: SequenceDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        n = len(self.dataset)
        if i < n:
            return {**self.dataset[i], "real": True}
        item = self.dataset[(i - n) % n]
        return {**item, "weight": torch.zeros_like(item["weight"]), "real": False}


def padded_collate(pad_id: int):
    collate = pad_collate(pad_id)

    def collate_with_flags(items: list[dict]) -> dict:
        return {**collate(items), "real": torch.tensor([bool(it["real"]) for it in items])}  # (B,)

    return collate_with_flags


class CalibrationData(L.LightningDataModule):
    """Serves the calibration set; each process gets its own shard (ranks are known only after launch)."""

    def __init__(self, calib: CalibrationSet, batch_size: int):
        super().__init__()
        if batch_size < 1:
            raise GispError(f"data.batch_size must be >= 1, got {batch_size}")
        self.dataset = PaddedDataset(SequenceDataset(calib))
        self.collate = padded_collate(calib.pad_id)
        self.batch_size = batch_size

    def val_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(self.dataset) < world:
            raise GispError(f"{len(self.dataset)} calibration samples cannot be split over {world} processes")
        lockstep = trainer is not None and world > 1 and is_sharded(trainer.strategy)
        sampler = ShardSampler(len(self.dataset), rank, world, equal_batches=self.batch_size if lockstep else None)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate)
