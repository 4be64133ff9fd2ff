"""Model-level objectives whose mean gradient drives the scores (method.md section 5).

Every objective is a signed, weighted sum of per-sequence losses, sum_i w_i * L_i, where L_i is the mean
next-token cross-entropy over the scored tokens of sequence i (label -100 marks tokens that are not scored):

- ``ppl``: all tokens of the text (or of the gold question + answer), w_i = 1/N: the mean loss.
- ``answer_ppl``: the answer tokens of gold (prompt, answer) pairs only, w_i = 1/N.
- ``margin``: the answer tokens of EVERY candidate of a multiple-choice question, w_i = +1/n+ for gold candidates
  and -1/n- for the others. Gradients are linear, so one backward of sum_i w_i L_i gives g_bar+ - g_bar- exactly:
  the reference's two sweeps and its stored second gradient copy are not needed.

The weights travel with the calibration set (``gisp.data.calibration``); the scoring pass backpropagates
sum_i w_i L_i batch by batch, so the accumulated gradient is the objective's gradient whatever the batch size or
the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gisp.errors import GispError


@dataclass(frozen=True)
class Objective:
    name: str
    candidates: str  # "gold": only the gold sequence of each item; "all": every candidate of a question
    scored_tokens: str  # "all": every token after the first; "answer": answer tokens only (prompt labels -100)
    signed: bool  # weights +1/n+ for gold and -1/n- for the other candidates (margin)
    description: str


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("ppl", "gold", "all", False, "mean next-token loss over all tokens (text, or question + answer)"),
        Objective("answer_ppl", "gold", "answer", False, "mean loss on the gold answer tokens only"),
        Objective("margin", "all", "answer", True, "mean answer loss of gold candidates minus that of the others"),
    )
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise GispError(f"unknown objective '{name}'; available: {sorted(OBJECTIVES)} (e.g. objective=margin)")
    return OBJECTIVES[name]


def check_supported(objective: Objective, data_kind: str) -> None:
    """Refuse an objective the calibration data cannot express: plain text has no answers, prompt/answer pairs
    (GSM8K) have no wrong candidates; multiple-choice data support every objective."""
    if data_kind == "text" and objective.name != "ppl":
        raise GispError(f"objective={objective.name} needs prompt/answer data (data=gsm8k) or multiple-choice data "
                        f"(data=cmqa); plain text windows (data.kind=text) only support objective=ppl")
    if data_kind == "gsm8k" and objective.signed:
        raise GispError(f"objective={objective.name} needs multiple-choice data (data=cmqa or data=medqa); "
                        "prompt/answer pairs (GSM8K) support objective=ppl or objective=answer_ppl")


def sequence_nll(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence, (B,); label -100 marks tokens that are not scored."""
    labels = input_ids if labels is None else labels
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    # The labels are shifted, not the logits: position t predicts label t+1, the last position predicts nothing
    # (-100). Slicing the logits instead would copy the largest activation (B, T, V) and its gradient.
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T), ignore_index=-100,
                          reduction="none").view(B, T)  # (B, T), 0 where not scored
    counts = (targets != -100).sum(dim=1)  # (B,)
    if bool((counts == 0).any()):
        raise GispError("a calibration sequence has no scored token (all labels are -100): check the data recipe")
    return nll.sum(dim=1) / counts


def batch_losses(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-sequence losses (B,) of a calibration batch {input_ids, labels?, attention_mask?}."""
    return sequence_nll(model, batch["input_ids"], batch.get("labels"), batch.get("attention_mask"))
