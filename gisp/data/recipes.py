"""Calibration recipes: one typed recipe per kind of calibration data, registered by its `kind` (conf/data).

A recipe holds the settings of its conf/data YAML (checked when the config is read, before any model is loaded)
and builds the calibration set for an objective once the tokenizer exists. Adding a kind = one dataclass with
`build(objective, tokenizer, data_dir)` + `@register_recipe("kind")` + a conf/data YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from gisp.data.calibration import CalibrationSet, from_pairs, from_questions, from_windows
from gisp.data.sources import TextSource, calibration_windows, load_text
from gisp.errors import GispError
from gisp.prune.objectives import Objective, check_supported

RECIPES: dict[str, type] = {}


def register_recipe(kind: str):
    def decorate(cls: type) -> type:
        cls.kind = kind
        RECIPES[kind] = cls
        return cls

    return decorate


def pad_id_of(tokenizer) -> int:
    """Padding is masked out (attention 0, label -100), so any valid id works; prefer the tokenizer's own."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@dataclass(frozen=True)
class _Recipe:
    kind: ClassVar[str]
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise GispError(f"data.batch_size must be an int >= 1, got {self.batch_size!r}")

    def check(self, objective: Objective) -> None:
        """Refuse an objective these data cannot express, before loading anything."""
        check_supported(objective, self.kind)

    def record(self, objective: Objective) -> dict:
        return {"batch_size": self.batch_size, "seed": self.seed, "objective": objective.name}


@register_recipe("text")
@dataclass(frozen=True)
class TextRecipe(_Recipe):
    """Random token windows of a text (C4, WikiText-2, Austen, any local text): objective=ppl."""

    text: TextSource = None  # type: ignore[assignment]
    n_samples: int = 16
    seq_len: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.text, TextSource):
            raise GispError("data.text must describe a text source (name, source, local_files / hub_path ...)")
        for name in ("n_samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise GispError(f"data.{name} must be an int >= 1, got {value!r}")

    def build(self, objective: Objective, tokenizer, data_dir: Path | None) -> CalibrationSet:
        text, prov = load_text(self.text, data_dir)
        windows = calibration_windows(text, tokenizer, self.n_samples, self.seq_len, self.seed)
        return from_windows(windows, objective, record=prov | self.record(objective) | {"seq_len": self.seq_len})


@register_recipe("gsm8k")
@dataclass(frozen=True)
class GSM8KRecipe(_Recipe):
    """GSM8K train: "Q: {question}\\nA: " + the gold solution (objective=ppl or answer_ppl)."""

    source: str = "auto"
    n_samples: int = 500
    cap_percentile: float = 100

    def build(self, objective: Objective, tokenizer, data_dir: Path | None) -> CalibrationSet:
        from gisp.data.gsm8k import calibration_pairs, load_gsm8k

        docs, prov = load_gsm8k("calibration", data_dir, source=self.source)
        pairs = calibration_pairs(docs, self.n_samples, self.seed)
        return from_pairs(pairs, tokenizer, objective, self.cap_percentile, pad_id=pad_id_of(tokenizer),
                          record=prov | self.record(objective))


@register_recipe("multiple_choice")
@dataclass(frozen=True)
class MultipleChoiceRecipe(_Recipe):
    """Every option of sampled multiple-choice questions (CMQA, MedQA) under a token budget (any objective)."""

    tasks: tuple[str, ...] = ()
    source: str = "auto"
    budget_tokens: int = 512000
    cap_percentile: float = 99
    split_seed: int = 1234

    def build(self, objective: Objective, tokenizer, data_dir: Path | None) -> CalibrationSet:
        from gisp.data.multiple_choice import load_questions

        questions, provenance = {}, {}
        for task in self.tasks:
            questions[task], provenance[task] = load_questions(task, "calibration", data_dir, source=self.source,
                                                               split_seed=self.split_seed)
        calib = from_questions(questions, tokenizer, objective, self.budget_tokens, self.cap_percentile,
                               self.seed, pad_id=pad_id_of(tokenizer), record=self.record(objective))
        for task, prov in provenance.items():
            calib.record["tasks"][task]["data"] = prov
        return calib


def recipe_from_fields(fields: dict) -> _Recipe:
    """The typed recipe of a conf/data node (plain values), or a GispError naming the field and the fix."""
    fields = dict(fields)
    kind = fields.pop("kind", "text")
    if kind not in RECIPES:
        raise GispError(f"data.kind {kind!r} is unknown; use one of {sorted(RECIPES)} (see conf/data/*.yaml)")
    if "text" in fields:
        fields["text"] = text_source(fields["text"])
    if "tasks" in fields:
        tasks = fields["tasks"]
        fields["tasks"] = (tasks,) if isinstance(tasks, str) else tuple(tasks or ())
    try:
        return RECIPES[kind](**fields)
    except TypeError as e:
        raise GispError(f"data (kind {kind}): {e}; see conf/data/*.yaml for the fields") from None


def text_source(fields: dict) -> TextSource:
    """A TextSource from a config node's plain values; `local_files` as a list (a lone string is one file)."""
    fields = dict(fields or {})
    files = fields.get("local_files") or ()
    fields["local_files"] = (files,) if isinstance(files, str) else tuple(files)
    try:
        return TextSource(**fields)
    except TypeError as e:
        raise GispError(f"bad text source config {fields}: {e}") from None
