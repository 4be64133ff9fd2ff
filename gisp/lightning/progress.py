"""The progress bar of the scoring passes (and of recovery fits): Lightning's TQDM bar, named after the pass, with its
tokens/s.

gisp passes this bar to the Trainer itself (Lightning would otherwise pick its rich bar when `rich` is installed).
Lightning disables the bars of every process but rank 0 (`ProgressBar.setup`), and this bar only touches its own
tqdm when it is enabled, so multi-process runs (DDP, FSDP) draw one bar and never reach for a bar that does not
exist. The module being run reports its throughput as `tokens_per_s` (None until it knows it).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ScoringProgressBar(TQDMProgressBar):
    """`validation`: what a validation epoch is called on the bar (the scoring pass; the validation of a recovery)."""

    def __init__(self, validation: str = "Scoring pass", **kwargs) -> None:
        super().__init__(**kwargs)
        self.validation = validation

    @property
    def validation_description(self) -> str:
        return self.validation

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if self.is_enabled and batch_idx == 0 and self._val_progress_bar is not None:
            self._val_progress_bar.set_description(self.validation_description)  # one loader: no "DataLoader 0"

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        rate = getattr(pl_module, "tokens_per_s", None)
        if self.is_enabled and rate is not None and self._val_progress_bar is not None:
            self._val_progress_bar.set_postfix({"tokens/s": f"{rate:.0f}"}, refresh=False)
