"""Model-level objectives whose mean gradient drives the scores (method.md section 5).

An objective maps a batch to one loss per sequence, (B,). The scoring pass backpropagates
sum(per-sequence losses) / N over all N calibration sequences, so the accumulated gradient is exactly the
gradient of the mean loss over the whole calibration set, whatever the batch size or the number of processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gisp.errors import GispError

OBJECTIVES = ("ppl",)


def sequence_nll(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, (B,); label -100 marks tokens that are not scored."""
    labels = input_ids if labels is None else labels
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")  # (B, T-1)
    counts = (shift_labels != -100).sum(dim=1)  # (B,)
    if bool((counts == 0).any()):
        raise GispError("a calibration sequence has no scored token (all labels are -100): check the data recipe")
    return nll.sum(dim=1) / counts


def objective_fn(name: str):
    """The per-sequence loss function of an objective."""
    if name == "ppl":
        return lambda model, batch: sequence_nll(model, batch["input_ids"], batch.get("labels"),
                                                 batch.get("attention_mask"))
    raise GispError(f"unknown objective '{name}'; available: {OBJECTIVES} (objective=ppl)")
