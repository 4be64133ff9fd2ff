"""The typed settings of a recovery (conf/recover): what it trains, on what, for how long, and how.

`recover_settings(node)` checks a `recover` config node before anything is loaded; `definition()` is what defines a
recovery's result (two commands with the same definition train the same weights), stored with its artefacts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from gisp.errors import GispError

log = logging.getLogger(__name__)

METHODS = ("none", "lora", "distill", "nested")
ADAPTERS = ("lora", "none")
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")
# Settings that change how a recovery runs or what is recorded on the way, never its weights.
EXECUTION_ONLY = ("name", "val_every", "eval_at", "precision_resolved")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = PROJECTIONS  # projections that get an adapter


@dataclass(frozen=True)
class RecoverSettings:
    """`method`: none, lora (cross-entropy on the level's compact model), distill (KL to the dense model's logits on
    the same student) or nested (one training of the dense weights under every level's masks, distilled from the
    dense model). `adapter`: lora (a peft LoRA, merged at the end) or none (every parameter of the student: full
    fine-tuning; `recover=lora recover.adapter=none` is full fine-tuning with cross-entropy)."""

    method: str = "none"
    name: str | None = None  # where it is stored (recovered/<name>) and how results.json names it; default: method
    adapter: str = "lora"
    lora: LoraSettings = field(default_factory=LoraSettings)
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    tokens: int = 500_000  # training tokens (all levels together for nested)
    seq_len: int = 256  # text windows; longer items (pairs, questions) are cut to it
    batch_size: int = 8  # sequences per process and micro-batch
    accumulate: int = 1  # micro-batches per optimizer step
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto: bf16-mixed on a GPU that has it, 32-true on the CPU
    val_every: int = 50  # optimizer steps between validations and checkpoints
    val_tokens: int = 16_384  # held-out tokens for the validation loss
    eval_at: tuple[int, ...] = ()  # training tokens at which the levels are evaluated on the way (a curve)
    temperature: float = 2.0  # distill, nested: softmax temperature of the KL (scaled by T^2)
    ce_weight: float = 0.0  # distill, nested: + ce_weight x cross-entropy on the training tokens
    chunk: int = 128  # sequence positions per logits chunk (the KL and the cross-entropy are computed in chunks)
    levels: tuple[float, ...] = ()  # deprecated (nested: levels added to `sparsity`)
    seed: int = 0
    data: dict | None = None  # a conf/data node; None: the run's calibration recipe

    @property
    def key(self) -> str:
        return self.name or self.method

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def distills(self) -> bool:
        return self.method in ("distill", "nested")

    @property
    def tokens_per_step(self) -> int:
        """Upper bound of the tokens one optimizer step sees per process (sequences are at most seq_len long)."""
        return self.batch_size * self.accumulate * self.seq_len

    def definition(self, data_record: dict) -> dict[str, Any]:
        """What defines the recovered weights: every setting but the execution-only ones, and the training data
        (recipe, content hash, tokens)."""
        out = {k: v for k, v in asdict(self).items() if k not in EXECUTION_ONLY and k != "data"}
        return {**out, "data": data_record}


def _number(value: Any, name: str, minimum: float, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        what = "an int" if integer else "a number"
        raise GispError(f"recover.{name} must be {what} >= {minimum}{' or null' if allow_none else ''}, got {value!r}")


def recover_settings(node: dict | None) -> RecoverSettings:
    """Typed, checked settings of a `recover` config node (plain values); GispError naming the field and the fix."""
    node = dict(node or {"method": "none"})
    known = {f.name for f in fields(RecoverSettings)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise GispError(f"recover: unknown field(s) {unknown}; its fields are {sorted(known)} (see conf/recover/)")
    lora = dict(node.pop("lora", None) or {})
    lora_known = {f.name for f in fields(LoraSettings)}
    if set(lora) - lora_known:
        raise GispError(f"recover.lora: unknown field(s) {sorted(set(lora) - lora_known)}; its fields are "
                        f"{sorted(lora_known)}")
    if "targets" in lora:
        lora["targets"] = (lora["targets"],) if isinstance(lora["targets"], str) else tuple(lora["targets"] or ())
    for key in ("eval_at", "levels"):
        if key in node:
            value = node[key]
            node[key] = tuple(value) if isinstance(value, (list, tuple)) else (() if value is None else (value,))
    if node.get("data") is not None and not isinstance(node["data"], dict):
        raise GispError(f"recover.data={node['data']!r}: recover.data takes a whole data node; pick one of conf/data "
                        f"with +data@recover.data={node['data']} (the `+data@` puts that config group there)")
    s = RecoverSettings(**node, lora=LoraSettings(**lora))
    if s.method not in METHODS:
        raise GispError(f"recover.method={s.method!r} is not one of {METHODS} (recover=lora|distill|nested|none)")
    if s.adapter not in ADAPTERS:
        raise GispError(f"recover.adapter={s.adapter!r} is not one of {ADAPTERS}: lora (a LoRA adapter, merged at the "
                        "end) or none (every parameter of the student)")
    if s.precision not in PRECISIONS:
        raise GispError(f"recover.precision={s.precision!r} is not one of {PRECISIONS}")
    bad = [t for t in s.lora.targets if t not in PROJECTIONS]
    if bad or not s.lora.targets:
        raise GispError(f"recover.lora.targets={list(s.lora.targets)}: name projections among {list(PROJECTIONS)}")
    _number(s.lora.rank, "lora.rank", 1, integer=True)
    _number(s.lora.alpha, "lora.alpha", 0)
    _number(s.lora.dropout, "lora.dropout", 0)
    if s.lora.dropout >= 1:
        raise GispError(f"recover.lora.dropout must be below 1, got {s.lora.dropout}")
    for name in ("tokens", "seq_len", "batch_size", "accumulate", "val_every", "val_tokens", "chunk"):
        _number(getattr(s, name), name, 1, integer=True)
    for name in ("lr", "temperature"):
        _number(getattr(s, name), name, 1e-12)
    for name in ("weight_decay", "warmup_ratio", "min_lr_ratio", "ce_weight"):
        _number(getattr(s, name), name, 0)
    _number(s.grad_clip, "grad_clip", 0, allow_none=True)
    if s.warmup_ratio >= 1 or s.min_lr_ratio > 1:
        raise GispError("recover.warmup_ratio must be below 1 and recover.min_lr_ratio at most 1")
    for t in s.eval_at:
        _number(t, "eval_at", 1, integer=True)
    for t in s.levels:
        _number(t, "levels", 0)
        if t >= 1:
            raise GispError(f"recover.levels are sparsity levels in [0, 1), got {t}")
    if s.levels:
        log.warning("recover.levels is deprecated: the levels are `sparsity` in every command (gisp.recover "
                    "sparsity=[...], gisp.run sparsity=[...]); recover.levels=%s still adds them", list(s.levels))
    check_host_memory(s)
    if s.key in ("", ".", "..") or "/" in s.key or s.key.startswith("."):
        raise GispError(f"recover.name={s.key!r} must be a plain folder name (it is stored under recovered/<name>)")
    return s


def available_host_memory() -> int | None:
    """Bytes of host memory available now (None where the system does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_memory(s: RecoverSettings) -> None:
    """The training items of recover.tokens are held in host memory (token ids and labels, 16 bytes a token, and a
    Python object per window): a budget that cannot fit is refused before anything loads, naming recover.tokens."""
    need = 16 * s.tokens + 400 * -(-s.tokens // s.seq_len)
    free = available_host_memory()
    if free is not None and need > free // 2:
        raise GispError(f"recover.tokens={s.tokens} needs about {need / 2**30:.1f} GiB of host memory for its training "
                        f"items, more than half of the {free / 2**30:.1f} GiB available: lower recover.tokens (the "
                        "recovered levels of the paper's recipe need a few million)")


def check_positions(s: RecoverSettings, max_positions: int | None, model: str) -> None:
    """A training window longer than the model's positions would fail mid-fit (or train past what it was trained on)."""
    if max_positions is not None and s.seq_len > max_positions:
        raise GispError(f"recover.seq_len={s.seq_len} exceeds the {max_positions} positions of model {model}: set "
                        f"recover.seq_len to at most {max_positions}")
