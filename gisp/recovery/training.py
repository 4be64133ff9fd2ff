"""Recovery training as Lightning's `Trainer.fit`: the LightningModule, its data module and the token-curve callback.

Resumable exactly: the training items are in a fixed order and one "epoch" is `val_every` optimizer steps, so a
validation and a checkpoint (`last.ckpt`, trainable weights + optimizer + schedule) fall on every epoch end, and the
loader of epoch e serves exactly the items after the ones consumed before it. Dropout (LoRA's) draws from a
generator seeded by the step, so a killed fit rerun from its last checkpoint trains the same weights as an
uninterrupted one. The teacher (the dense model) is held outside the module's parameters: never trained, never
checkpointed, never in the optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from gisp.data.calibration import pad_collate
from gisp.lightning.datamodule import ShardSampler
from gisp.prune.masks import MaskApplier, Masks
from gisp.recovery.data import TrainingSet
from gisp.recovery.losses import chunked_cross_entropy, chunked_kl
from gisp.recovery.settings import RecoverSettings
from gisp.recovery.students import hidden_states, output_head, trainable

log = logging.getLogger(__name__)


class _Items(Dataset):
    def __init__(self, items: list[tuple[torch.Tensor, torch.Tensor]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        x, y = self.items[i % len(self.items)]
        return {"input_ids": x, "labels": y, "weight": torch.tensor(1.0)}


class _EpochSampler(Sampler[int]):
    """The item indices one process reads in one epoch: global micro-batch b holds items [b W B, (b + 1) W B) and
    process r reads its slice of B (W processes, B per process); indices past the end wrap around, so every process
    runs the same number of micro-batches."""

    def __init__(self, first_batch: int, n_batches: int, rank: int, world: int, batch_size: int):
        self.indices = [(b * world + rank) * batch_size + j for b in range(first_batch, first_batch + n_batches)
                        for j in range(batch_size)]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def schedule(settings: RecoverSettings, items: int, world: int) -> tuple[int, int]:
    """(optimizer steps, steps per epoch) for `items` training items over `world` processes."""
    per_step = settings.batch_size * settings.accumulate * world
    steps = max(1, math.ceil(items / per_step))
    return steps, min(settings.val_every, steps)


class TrainingData(L.LightningDataModule):
    def __init__(self, data: TrainingSet, settings: RecoverSettings, steps: int, steps_per_epoch: int):
        super().__init__()
        self.data, self.settings = data, settings
        self.steps, self.steps_per_epoch = steps, steps_per_epoch
        self.collate = pad_collate(data.pad_id)

    def _where(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._where()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        acc, batch = self.settings.accumulate, self.settings.batch_size
        first_step = epoch * self.steps_per_epoch
        n_steps = max(0, min(self.steps_per_epoch, self.steps - first_step))
        sampler = _EpochSampler(first_step * acc, n_steps * acc, rank, world, batch)
        return DataLoader(_Items(self.data.train), batch_size=batch, sampler=sampler, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._where()
        sampler = ShardSampler(len(self.data.val), rank, world)
        return DataLoader(_Items(self.data.val), batch_size=self.settings.batch_size, sampler=sampler,
                          collate_fn=self.collate)


@dataclass
class NestedLevels:
    """The levels a nested recovery trains, switched per micro-batch on the student through its mask applier: a
    seeded shuffled round-robin, so every level gets an equal share and the draw depends only on the batch number."""

    keys: list[str]
    masks: list[Masks]
    applier: MaskApplier
    seed: int

    def index_at(self, micro_batch: int) -> int:
        k = len(self.keys)
        rnd, pos = divmod(micro_batch, k)
        order = torch.randperm(k, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + rnd))
        return int(order[pos])

    def use(self, i: int) -> None:
        self.applier.set(self.masks[i])

    def dense(self) -> None:
        self.applier.set(Masks.dense(self.applier.structure))


class RecoveryModule(L.LightningModule):
    """`student` trains on cross-entropy (recover=lora) or on the KL to `teacher`'s logits (distill, nested; plus
    ce_weight x cross-entropy). `teacher_view`: a context in which `teacher` gives the dense model's outputs (for a
    nested LoRA student, the student itself with its adapter off and no masks: no second copy of the model)."""

    def __init__(self, student: nn.Module, settings: RecoverSettings, steps: int, teacher: nn.Module | None = None,
                 nested: NestedLevels | None = None,
                 teacher_view: Callable[[], contextlib.AbstractContextManager] | None = None):
        super().__init__()
        self.student = student
        self.settings = settings
        self.steps = steps
        self._teacher = (teacher,)  # a tuple, not an attribute Lightning would register as a submodule
        self.teacher_view = teacher_view or contextlib.nullcontext
        self.nested = nested
        self.strict_loading = False  # checkpoints hold only what trains
        self.tokens_seen = 0  # training tokens of all processes (restored on resume)
        self.seconds_before = 0.0  # wall time of the invocations before a resume
        self._fit_started = 0.0
        self._tokens_at_start = 0
        self._resumed_at: int | None = None  # the optimizer step a resumed fit starts from
        self._val: dict[str, list[float]] = {}

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0]

    # -- checkpoints: only the trained tensors, and the token count ------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        names = {f"student.{n}" for n, _ in trainable(self.student)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
        checkpoint["gisp_tokens_seen"] = self.tokens_seen
        checkpoint["gisp_seconds"] = self.seconds_before + time.perf_counter() - self._fit_started

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tokens_seen = int(checkpoint.get("gisp_tokens_seen", 0))
        self.seconds_before = float(checkpoint.get("gisp_seconds", 0.0))

    # -- training ----------------------------------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.student.train()  # the adapter's dropout on (Lightning leaves the modes as it finds them)
        if self.teacher is not None and self.teacher is not self.student:
            self.teacher.to(self.device).eval()
        self._fit_started, self._tokens_at_start = time.perf_counter(), self.tokens_seen

    def on_train_start(self) -> None:
        """After a resume: the loggers' step continues at the restored optimizer step (Lightning 2.6 restores its
        logging counter one ahead from an end-of-epoch checkpoint), and rows a killed invocation logged after its last
        checkpoint are dropped, so a curve has each step once."""
        step = self.trainer.global_step
        if step == 0:
            return
        self._resumed_at = step
        for logger in self.trainer.loggers:
            if hasattr(logger, "drop_steps_from"):
                logger.drop_steps_from(step)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self._resumed_at is not None:  # the epoch loop's reset (after on_train_start) moved the counter ahead
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self._resumed_at
            self._resumed_at = None

    def _micro_batch(self, batch_idx: int) -> int:
        """The global number of this micro-batch over the whole fit (resumes included)."""
        t = self.trainer
        epoch_start = t.current_epoch * min(self.settings.val_every, self.steps) * self.settings.accumulate
        return epoch_start + batch_idx

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        s = self.settings
        micro = self._micro_batch(batch_idx)
        # dropout masks depend on the micro-batch only: a resumed fit draws what the uninterrupted one drew
        torch.manual_seed(s.seed * 1_000_003 + micro * 7919 + self.global_rank)
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        teacher_hidden = None
        if s.distills:
            with torch.no_grad(), self.teacher_view():
                if self.nested is not None:
                    self.nested.dense()
                teacher_hidden = hidden_states(self.teacher, ids, mask)
        level = None
        if self.nested is not None:
            level = self.nested.index_at(micro)
            self.nested.use(level)
        hidden = hidden_states(self.student, ids, mask)
        head = output_head(self.student)
        if teacher_hidden is not None:
            kl, n = chunked_kl(hidden, head, teacher_hidden, output_head(self.teacher), labels, s.chunk,
                               s.temperature)
            loss = kl / max(n, 1)
            if s.ce_weight:
                ce, _ = chunked_cross_entropy(hidden, head, labels, s.chunk)
                loss = loss + s.ce_weight * ce / max(n, 1)
        else:
            ce, n = chunked_cross_entropy(hidden, head, labels, s.chunk)
            loss = ce / max(n, 1)
        tokens = int(mask.sum()) if mask is not None else ids.numel()
        self.tokens_seen += tokens * self.trainer.world_size
        rate = (self.tokens_seen - self._tokens_at_start) / max(time.perf_counter() - self._fit_started, 1e-9)
        self.log("recover/train_loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("recover/tokens_per_s", rate, prog_bar=True, on_step=True, on_epoch=False)
        self.log("recover/tokens", float(self.tokens_seen), on_step=True, on_epoch=False)
        self.log("recover/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        if level is not None:
            self.log("recover/level", float(level), on_step=True, on_epoch=False)
        return loss

    # -- validation: cross-entropy on the held-out items (every level for nested) ---------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        levels = range(len(self.nested.keys)) if self.nested is not None else [None]
        for level in levels:
            if level is not None:
                self.nested.use(level)
            hidden = hidden_states(self.student, batch["input_ids"], batch.get("attention_mask"))
            ce, n = chunked_cross_entropy(hidden, output_head(self.student), batch["labels"], self.settings.chunk)
            key = "val_loss" if level is None else f"val_loss/{self.nested.keys[level]}"
            total = self._val.setdefault(key, [0.0, 0.0])
            total[0] += float(ce)
            total[1] += n

    def on_validation_epoch_end(self) -> None:
        for key, (total, count) in sorted(self._val.items()):
            sums = torch.tensor([total, count], dtype=torch.float64, device=self.device)
            if self.trainer.world_size > 1:
                sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            self.log(f"recover/{key}", float(sums[0] / max(float(sums[1]), 1.0)), prog_bar=key == "val_loss",
                     sync_dist=False, rank_zero_only=True)

    # -- optimizer: AdamW over what trains, linear warmup then cosine ------------------------------------------

    def configure_optimizers(self):
        s = self.settings
        params = [p for _, p in trainable(self.student)]
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        warmup = max(1, math.ceil(s.warmup_ratio * self.steps)) if s.warmup_ratio else 0
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(warmup, self.steps, s.min_lr_ratio)),
            "interval": "step"}}


def lr_factor(warmup: int, steps: int, floor: float) -> Callable[[int], float]:
    """The learning-rate multiplier at optimizer step k: linear warmup over `warmup` steps, then a cosine from 1 to
    `floor` at the last step."""

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        progress = (k - warmup) / max(steps - warmup, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class AtomicCheckpoint(L.Callback):
    """`last.ckpt` after every validation (every `recover.val_every` optimizer steps: one "epoch"), written under a
    temporary name and renamed, so a kill at any moment leaves the previous checkpoint or the new one, never half of
    one. (Lightning's ModelCheckpoint with save_top_k=0 and save_last=True writes last.ckpt only when the fit ends,
    so a killed fit would lose everything; what a resume needs is tested here, not assumed of a Lightning version.)"""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step >= trainer.fit_loop.epoch_loop.max_steps:
            return  # the fit is complete: its weights are stored next, the checkpoint would be deleted at once
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        trainer.save_checkpoint(tmp, weights_only=False)  # the optimizer and schedule too (rank 0 writes)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("gisp-checkpoint")


class TokenCurve(L.Callback):
    """Evaluates the student when the training tokens pass each of `milestones` (recover.eval_at): a curve of the
    metrics over tokens, kept in checkpoints so a resumed fit keeps the points it already has. `evaluate()` returns
    {level: metrics}; it runs on rank 0 (the other processes wait at the next collective)."""

    def __init__(self, milestones: tuple[int, ...], evaluate: Callable[[], dict[str, dict[str, float]]]):
        self.milestones = sorted(milestones)
        self.evaluate = evaluate
        self.points: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = {p["milestone"] for p in self.points}
        due = [m for m in self.milestones if m <= pl_module.tokens_seen and m not in done]
        if not due or (batch_idx + 1) % pl_module.settings.accumulate:
            return
        if trainer.is_global_zero:
            was = pl_module.student.training
            pl_module.student.eval()
            with torch.no_grad():
                metrics = self.evaluate()
            pl_module.student.train(was)
            for level, values in metrics.items():
                for m in due:
                    self.points.append({"milestone": m, "tokens": pl_module.tokens_seen, "level": level,
                                        "metrics": values})
            log.info("after %d training tokens: %s", pl_module.tokens_seen, metrics)
            for logger in trainer.loggers:
                logger.log_metrics({f"recover/curve/{level}/{k}": v for level, vs in metrics.items()
                                    for k, v in vs.items()}, step=trainer.global_step)
        else:
            self.points += [{"milestone": m} for m in due]

    def state_dict(self) -> dict:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict) -> None:
        self.points = list(state_dict.get("points", []))
