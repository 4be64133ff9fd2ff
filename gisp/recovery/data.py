"""Training and validation data of a recovery, from the `data` group's recipes, under a token budget.

Text recipes (Austen, C4, WikiText-2 valid, local text): the text's token stream is cut in two, the last
`val_tokens` (non-overlapping windows) held out for the validation loss, training windows drawn at random (seeded)
from the rest. Pair and question recipes (GSM8K, CMQA): the recipe's items with the prompt unscored (answer tokens
only), in a seeded order, the first `val_tokens` worth held out. Either way the training and validation items are
disjoint, and both come from data the recipe keeps disjoint from what is evaluated (calibration halves offline).
When the budget is larger than the data, items are repeated in a new seeded order each pass (recorded as epochs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
from dataclasses import dataclass, field

import torch

from gisp.data.recipes import GSM8KRecipe, MultipleChoiceRecipe, TextRecipe, pad_id_of
from gisp.data.sources import load_text, tokenize_stream
from gisp.errors import GispError
from gisp.prune.objectives import get_objective

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, torch.Tensor]  # input_ids (T,), labels (T,) with -100 where nothing is scored


@dataclass
class TrainingSet:
    train: list[Item]  # in training order (repeats included)
    val: list[Item]
    pad_id: int = 0
    record: dict = field(default_factory=dict)

    @property
    def train_tokens(self) -> int:
        return sum(int(x.numel()) for x, _ in self.train)

    def content_sha256(self) -> str:
        h = hashlib.sha256()
        for part in (self.train, self.val):
            h.update(str(len(part)).encode())
            for x, y in part:
                h.update(x.to(torch.int64).numpy().tobytes())
                h.update(y.to(torch.int64).numpy().tobytes())
        return h.hexdigest()


def training_set(recipe, tokenizer, data_dir, tokens: int, seq_len: int, val_tokens: int, seed: int) -> TrainingSet:
    """The training and validation items of `recipe` (a gisp.data.recipes recipe) for `tokens` training tokens."""
    if isinstance(recipe, TextRecipe):
        train, val, record = _text(recipe, tokenizer, data_dir, tokens, seq_len, val_tokens, seed)
    elif isinstance(recipe, (GSM8KRecipe, MultipleChoiceRecipe)):
        train, val, record = _items(recipe, tokenizer, data_dir, tokens, seq_len, val_tokens, seed)
    else:
        raise GispError(f"recovery cannot train on data of kind {recipe.kind!r}: use a text, gsm8k or "
                        "multiple_choice recipe (recover.data=...)")
    out = TrainingSet(train, val, pad_id_of(tokenizer), record)
    out.record.update(train_sequences=len(train), train_tokens=out.train_tokens, val_sequences=len(val),
                      val_tokens=sum(int(x.numel()) for x, _ in val), seed=seed, seq_len=seq_len,
                      content_sha256=out.content_sha256())
    log.info("recovery data %s: %d training sequences (%d tokens), %d validation sequences", record.get("name"),
             len(train), out.train_tokens, len(val))
    return out


def _text(recipe: TextRecipe, tokenizer, data_dir, tokens, seq_len, val_tokens, seed):
    text, prov = load_text(recipe.text, data_dir)
    ids = tokenize_stream(text, tokenizer, add_special_tokens=False)  # (n,)
    n_val = max(1, math.ceil(val_tokens / seq_len))
    val_start = ids.numel() - n_val * seq_len
    if val_start < 4 * seq_len:
        raise GispError(f"recovery data {recipe.text.name!r}: {ids.numel()} tokens leave too little for training "
                        f"after {n_val} validation windows of {seq_len}; lower recover.val_tokens or recover.seq_len")
    val = [ids[val_start + i * seq_len: val_start + (i + 1) * seq_len] for i in range(n_val)]
    n_train = math.ceil(tokens / seq_len)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, val_start - seq_len + 1, (n_train,), generator=gen)  # windows end before validation
    train = [ids[s: s + seq_len] for s in starts.tolist()]
    record = {**prov, "kind": "text", "held_out": f"the last {n_val * seq_len} tokens of the stream",
              "epochs": round(n_train * seq_len / max(val_start, 1), 3)}
    return [(x, x.clone()) for x in train], [(x, x.clone()) for x in val], record


def _items(recipe, tokenizer, data_dir, tokens, seq_len, val_tokens, seed):
    """Answer-scored items of a pair / question recipe: every GSM8K train pair, or CMQA gold candidates for the
    budget (the recipe's own sampling, length caps and disjointness from the evaluation half)."""
    objective = get_objective("answer_ppl")
    if isinstance(recipe, MultipleChoiceRecipe):
        recipe = dataclasses.replace(recipe, budget_tokens=int(1.2 * (tokens + val_tokens)) + 1, seed=seed)
    else:
        from gisp.data.gsm8k import load_gsm8k

        docs, _ = load_gsm8k("calibration", data_dir, source=recipe.source)
        recipe = dataclasses.replace(recipe, n_samples=len(docs), seed=seed)  # every pair; the budget picks
    calib = recipe.build(objective, tokenizer, data_dir)
    items = [(x[:seq_len], y[:seq_len]) for x, y in zip(calib.input_ids, calib.labels)]
    items = [(x, y) for x, y in items if (y[1:] != -100).any()]  # an item cut before its answer teaches nothing
    rng = random.Random(f"recover:{seed}")
    rng.shuffle(items)
    val, held = [], 0
    while items and held < val_tokens and len(items) > 1:
        x, y = items.pop()
        val.append((x, y))
        held += int(x.numel())
    if not items:
        raise GispError(f"recovery data {recipe.kind}: no items left for training after the validation items; lower "
                        "recover.val_tokens")
    train, used, epochs = [], 0, 0
    while used < tokens:
        order = list(items)
        rng.shuffle(order)
        epochs += 1
        for x, y in order:
            if used >= tokens:
                break
            train.append((x, y))
            used += int(x.numel())
    name = calib.record.get("name") or calib.record.get("dataset") or recipe.kind
    record = {"name": name, "kind": recipe.kind, "recipe_record": calib.record, "scored": "answer tokens",
              "held_out": f"{len(val)} items of the recipe's calibration part", "epochs": epochs}
    return train, val, record
