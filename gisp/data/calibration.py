"""Calibration sets: token sequences, which tokens are scored, and each sequence's signed weight.

Three kinds of data feed the same scoring pass:
- text windows (C4, WikiText-2, any text): every token scored, weight 1/N;
- (prompt, answer) pairs (GSM8K): the prompt's labels are -100 for ``answer_ppl``;
- multiple-choice questions (CMQA, MedQA): every candidate of a sampled question, answer tokens scored, weights
  +1/n+ (gold) and -1/n- (the others) for ``margin`` (see gisp.prune.objectives).

Sequences have different lengths; batches are right-padded (labels -100, attention mask 0 on padding). The set is
sorted by length so that batches hold similar lengths: the objective is a sum, so the order does not matter.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from gisp.errors import GispError
from gisp.prune.objectives import Objective, check_supported

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    input_ids: list[torch.Tensor]  # each (T_i,) int64
    labels: list[torch.Tensor]  # each (T_i,) int64; -100 = not scored
    weights: torch.Tensor  # (N,) float64: the objective is sum_i weights[i] * loss_i
    pad_id: int = 0
    record: dict = field(default_factory=dict)  # provenance and counts, stored in results.json

    def __post_init__(self) -> None:
        if not self.input_ids:
            raise GispError("the calibration set is empty; check data.n_samples / data.budget_tokens")
        order = sorted(range(len(self.input_ids)), key=lambda i: -self.input_ids[i].numel())
        self.input_ids = [self.input_ids[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.weights = self.weights[order]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        return sum(int(x.numel()) for x in self.input_ids)

    def content_sha256(self) -> str:
        """Hash of exactly what is scored (token ids, labels, weights): part of a trajectory's identity, so a changed
        data file or tokenizer never resumes or reuses a trajectory computed on other data."""
        h = hashlib.sha256()
        for ids, labels in zip(self.input_ids, self.labels):
            h.update(ids.to(torch.int64).numpy().tobytes())
            h.update(labels.to(torch.int64).numpy().tobytes())
        h.update(self.weights.to(torch.float64).numpy().tobytes())
        return h.hexdigest()


def from_windows(windows: torch.Tensor, objective: Objective, record: dict | None = None) -> CalibrationSet:
    """Equal-length text windows (N, T): every token scored, weight 1/N (the perplexity objective only)."""
    check_supported(objective, "text")
    n = windows.shape[0]
    rows = list(windows)
    return CalibrationSet(rows, [r.clone() for r in rows], torch.full((n,), 1.0 / n, dtype=torch.float64),
                          record=dict(record or {}, kind="text", n_sequences=n, n_tokens=int(windows.numel())))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context + continuation and the number of context tokens.

    As lm-eval does, trailing whitespace of the context moves to the continuation (" yes" is one token, "\\n A: "
    would end in a lone space token); the context gets the tokenizer's special tokens (BOS), the continuation none.
    """
    return encode_pairs(tokenizer, [(context, continuation)])[0]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """`encode_pair` of many pairs in two batched tokenizer calls (the tokenizer's batch path: tens of thousands of
    candidates in a second instead of one call each)."""
    if not pairs:
        return []
    contexts = [c.rstrip() for c, _ in pairs]
    continuations = [c[len(s):] + a for (c, a), s in zip(pairs, contexts)]
    ctx = tokenizer(contexts, add_special_tokens=True)["input_ids"]
    cont = tokenizer(continuations, add_special_tokens=False)["input_ids"]
    out = []
    for c, a, stripped in zip(ctx, cont, contexts):
        if not a:
            raise GispError(f"empty answer after tokenization for prompt {stripped[-60:]!r}: check the data")
        out.append((list(c) + list(a), len(c)))
    return out


def _sequence(ids: list[int], n_context: int, scored_tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(ids, dtype=torch.int64)  # (T,)
    y = x.clone()
    if scored_tokens == "answer":
        y[:n_context] = -100
    return x, y


def length_cap(lengths: Sequence[int], percentile: float) -> int:
    """The per-task length cap: the ``percentile``-th percentile of the lengths (the reference's 99th)."""
    if not 0 < percentile <= 100:
        raise GispError(f"cap_percentile must be in (0, 100], got {percentile}")
    return math.ceil(float(np.percentile(np.asarray(lengths), percentile)))


def from_pairs(pairs: Sequence[tuple[str, str]], tokenizer, objective: Objective, cap_percentile: float = 100.0,
               pad_id: int = 0, record: dict | None = None) -> CalibrationSet:
    """(prompt, answer) pairs such as GSM8K question + gold solution; longer than the length cap are skipped."""
    check_supported(objective, "gsm8k")
    encoded = encode_pairs(tokenizer, pairs)
    cap = length_cap([len(ids) for ids, _ in encoded], cap_percentile)
    kept = [(ids, n_ctx) for ids, n_ctx in encoded if len(ids) <= cap]
    skipped = len(encoded) - len(kept)
    if skipped:
        log.warning("calibration: skipped %d of %d pairs longer than the length cap of %d tokens", skipped,
                    len(encoded), cap)
    seqs = [_sequence(ids, n_ctx, objective.scored_tokens) for ids, n_ctx in kept]
    n = len(seqs)
    return CalibrationSet([s[0] for s in seqs], [s[1] for s in seqs], torch.full((n,), 1.0 / max(n, 1),
                          dtype=torch.float64), pad_id=pad_id,
                          record=dict(record or {}, kind="pairs", n_pairs=len(encoded), skipped_over_cap=skipped,
                                      length_cap=cap, n_sequences=n, n_tokens=sum(len(i) for i, _ in kept)))


def from_questions(questions_by_task: dict[str, list], tokenizer, objective: Objective, budget_tokens: int,
                   cap_percentile: float, seed: int, pad_id: int = 0, record: dict | None = None) -> CalibrationSet:
    """Multiple-choice calibration: the reference's recipe (method.md section 5).

    The token budget is split evenly over the tasks. Per task the length cap is the ``cap_percentile``-th
    percentile of candidate lengths (prompt + answer tokens); questions are drawn in a seeded order, a question with a
    candidate over the cap is skipped (counted), and questions are taken while their candidates fit the task's
    budget. Every candidate of a drawn question is used: all of them for ``margin`` (signed weights), the gold one
    for ``ppl`` / ``answer_ppl``. The same questions are drawn whatever the objective.
    """
    if budget_tokens < 1:
        raise GispError(f"data.budget_tokens must be >= 1, got {budget_tokens}")
    per_task = budget_tokens // max(len(questions_by_task), 1)
    seqs: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (input_ids, labels, is_gold)
    tasks_record = {}
    for task, questions in questions_by_task.items():
        flat = encode_pairs(tokenizer, [(c.context, c.continuation) for q in questions for c in q.candidates])
        encoded, at = [], 0
        for q in questions:  # back into questions: one (ids, n_context) per candidate
            encoded.append(flat[at:at + len(q.candidates)])
            at += len(q.candidates)
        lengths = [len(ids) for cands in encoded for ids, _ in cands]
        if not lengths:
            raise GispError(f"calibration task {task!r} has no questions; check its data files")
        cap = length_cap(lengths, cap_percentile)
        order = list(range(len(questions)))
        random.Random(f"{seed}:{task}").shuffle(order)
        used = skipped = tokens = 0
        for qi in order:
            cands = encoded[qi]
            if max(len(ids) for ids, _ in cands) > cap:
                skipped += 1
                continue
            cost = sum(len(ids) for ids, _ in cands)
            if tokens + cost > per_task:
                break
            tokens += cost
            used += 1
            for ci, (ids, n_ctx) in enumerate(cands):
                gold = ci == questions[qi].gold
                if objective.candidates == "all" or gold:
                    x, y = _sequence(ids, n_ctx, objective.scored_tokens)
                    seqs.append((x, y, gold))
        if used == 0:
            raise GispError(
                f"calibration task {task!r}: no question fits its share of the token budget ({per_task} tokens of "
                f"data.budget_tokens={budget_tokens}) under the length cap of {cap} tokens; raise data.budget_tokens"
            )
        if skipped:
            log.warning("calibration %s: skipped %d questions with a candidate over the %d-token cap", task, skipped,
                        cap)
        tasks_record[task] = {"questions": used, "tokens": tokens, "length_cap": cap, "skipped_over_cap": skipped,
                              "pool": len(questions)}
        log.info("calibration %s: %d questions, %d tokens (cap %d, %d skipped)", task, used, tokens, cap, skipped)
    gold = torch.tensor([g for _, _, g in seqs])
    if objective.signed:
        n_pos, n_neg = int(gold.sum()), int((~gold).sum())
        if n_neg == 0:
            raise GispError("objective=margin needs wrong candidates, but every sampled question has one option")
        weights = torch.where(gold, 1.0 / n_pos, -1.0 / n_neg).to(torch.float64)
    else:
        weights = torch.full((len(seqs),), 1.0 / len(seqs), dtype=torch.float64)
    return CalibrationSet([s[0] for s in seqs], [s[1] for s in seqs], weights, pad_id=pad_id,
                          record=dict(record or {}, kind="multiple_choice", budget_tokens=budget_tokens,
                                      cap_percentile=cap_percentile, seed=seed, tasks=tasks_record,
                                      n_sequences=len(seqs), n_gold=int(gold.sum()),
                                      n_tokens=sum(int(s[0].numel()) for s in seqs)))


class SequenceDataset(Dataset):
    """Items {input_ids (T,), labels (T,), weight ()} of a calibration set."""

    def __init__(self, calib: CalibrationSet):
        self.calib = calib

    def __len__(self) -> int:
        return len(self.calib)

    def __getitem__(self, i: int) -> dict:
        c = self.calib
        return {"input_ids": c.input_ids[i], "labels": c.labels[i], "weight": c.weights[i]}


def pad_collate(pad_id: int):
    """Right-pad a list of items to a batch; an attention mask only when lengths differ (equal windows keep the
    plain causal path)."""

    def collate(items: list[dict]) -> dict:
        lengths = [int(it["input_ids"].numel()) for it in items]
        width = max(lengths)
        ids = torch.full((len(items), width), pad_id, dtype=torch.int64)  # (B, T)
        labels = torch.full((len(items), width), -100, dtype=torch.int64)  # (B, T)
        for b, it in enumerate(items):
            ids[b, : lengths[b]] = it["input_ids"]
            labels[b, : lengths[b]] = it["labels"]
        batch = {"input_ids": ids, "labels": labels, "weight": torch.stack([it["weight"] for it in items])}
        if min(lengths) != width:
            batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        return batch

    return collate
