"""The evaluation suite: every metric of the live (possibly masked) model at one sparsity level.

Evaluation kinds are a registry (`EVAL_KINDS`: kind -> its settings fields and a builder), so a new kind of
evaluation is one class with `__call__(model, tokenizer, progress)` and `describe()`, one entry, and a conf/eval
YAML. Perplexity windows are tokenized once per run so that every level is scored on the very same tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol

import torch

from gisp.data.sources import TextSource, load_text, tokenize_stream, windows_from_stream
from gisp.errors import GispError
from gisp.eval.perplexity import PerplexityTask, perplexity

logger = logging.getLogger(__name__)


class EvalSuite(Protocol):
    """An evaluation beyond perplexity (lm-eval zero-shot tasks, GSM8K): prepared once, called per sparsity level."""

    def __call__(self, model: torch.nn.Module, tokenizer, progress: bool = True) -> dict[str, float]: ...

    def describe(self) -> dict: ...


class Evaluator:
    """Holds tokenized evaluation windows (built once) and evaluates a live model: metrics dict.

    Built once per run so that every pruning step is scored on the very same tokens.
    """

    def __init__(self, tasks: list[PerplexityTask], tokenizer, data_dir: Path | None,
                 suites: dict[str, EvalSuite] | None = None, max_positions: int | None = None) -> None:
        metrics = [t.metric for t in tasks]
        if len(set(metrics)) != len(metrics):
            raise GispError(f"duplicate evaluation metric names {metrics}; give each task a distinct metric")
        if max_positions is not None:  # "context 2048 or the model's maximum"
            for t in tasks:
                if t.seq_len > max_positions:
                    logger.warning("metric %s: seq_len %d exceeds the model's maximum of %d positions; using %d",
                                   t.metric, t.seq_len, max_positions, max_positions)
            tasks = [replace(t, seq_len=min(t.seq_len, max_positions)) for t in tasks]
        self.tasks = list(tasks)
        self.tokenizer = tokenizer
        self.suites = dict(suites or {})
        self.windows: dict[str, torch.Tensor] = {}
        self._info: dict[str, dict] = {}
        # metric -> the task that measures it (results.json keeps it per level, next to the task's protocol hash)
        self.metric_tasks: dict[str, str] = {m: t.metric for t in self.tasks for m in (t.metric, f"{t.metric}_stderr")}
        streams: dict[TextSource, tuple[torch.Tensor, dict]] = {}  # tokenize each distinct text once
        for task in self.tasks:
            if task.source not in streams:
                text, prov = load_text(task.source, data_dir)
                streams[task.source] = (tokenize_stream(text, tokenizer, add_special_tokens=True), prov)
            ids, prov = streams[task.source]  # (n_tokens,)
            available = ids.numel() // task.seq_len
            win = windows_from_stream(ids, task.seq_len, task.max_windows)  # (n_windows, seq_len)
            if win.shape[0] == 0:
                raise GispError(
                    f"metric {task.metric!r}: no evaluation windows: text {prov['name']!r} has {ids.numel()} "
                    f"tokens, shorter than one window of seq_len={task.seq_len}; use a smaller seq_len"
                )
            self.windows[task.metric] = win
            self._info[task.metric] = {
                "dataset": dict(prov),
                "variant": task.variant,
                "seq_len": task.seq_len,
                "n_windows": int(win.shape[0]),
                "n_tokens": int(win.numel()),
                "stream_tokens": int(ids.numel()),
                "subset": bool(win.shape[0] < available),
                "batch_size": task.batch_size,
            }
            logger.info("evaluation %s: %d windows of %d tokens", task.metric, win.shape[0], task.seq_len)

    def __call__(self, model: torch.nn.Module, progress: bool = True) -> dict[str, float]:
        """Every metric of ``model`` as it is now (masks included): perplexities, then the suites' metrics."""
        return self.merge(self.perplexities(model, progress), self.suite_metrics(model, progress))

    def perplexities(self, model: torch.nn.Module, progress: bool = True, rank: int = 0, world_size: int = 1,
                     reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, lockstep: bool = False
                     ) -> dict[str, float]:
        """The perplexity metrics and their standard errors over the windows (`{metric}_stderr`); over several
        processes each scores its share of the windows (see gisp.eval.perplexity.perplexity) and every process gets
        the single-process values."""
        out: dict[str, float] = {}
        for t in self.tasks:
            out[t.metric], out[f"{t.metric}_stderr"] = perplexity(
                model, self.windows[t.metric], t.batch_size, progress=progress, desc=t.metric, rank=rank,
                world_size=world_size, reduce_fn=reduce_fn, lockstep=lockstep, with_stderr=True)
        return out

    def suite_metrics(self, model: torch.nn.Module, progress: bool = True) -> dict[str, float]:
        """The metrics of the suites (lm-eval tasks, GSM8K): one process, the whole model."""
        metrics: dict[str, float] = {}
        for name, suite in self.suites.items():
            more = suite(model, self.tokenizer, progress=progress)
            metrics = self.merge(metrics, more, name)
            self.metric_tasks.update(dict.fromkeys(more, name))
        return metrics

    @staticmethod
    def merge(metrics: dict[str, float], more: dict[str, float], name: str = "") -> dict[str, float]:
        clash = sorted(set(more) & set(metrics))
        if clash:
            raise GispError(f"evaluation suite {name!r} reports metrics {clash} that another task reports too")
        return {**metrics, **more}

    @property
    def perplexity_metrics(self) -> list[str]:
        return [t.metric for t in self.tasks]

    def describe(self) -> dict:
        """Per perplexity metric: dataset provenance, seq_len, n_windows, n_tokens, subset (max_windows cut it);
        per suite: its own description (data files, splits, limits, items evaluated)."""
        out = {m: {**info, "dataset": dict(info["dataset"])} for m, info in self._info.items()}
        return out | {name: suite.describe() for name, suite in self.suites.items()}


# ---------------------------------------------------------------------------------------------------------------
# The registry of evaluation kinds


@dataclass(frozen=True)
class EvalTaskSpec:
    """One entry of `eval.tasks`: its name (the metric for perplexity), kind and settings (plain values)."""

    name: str
    kind: str
    settings: tuple[tuple[str, object], ...]  # sorted (field, value) pairs: hashable and printable

    @property
    def fields(self) -> dict:
        return dict(self.settings)


@dataclass(frozen=True)
class EvalKind:
    """`settings_class()` gives the dataclass whose fields the YAML sets (imported lazily: lm-eval is heavy);
    `build(spec, data_dir, work_dir)` makes the runnable task (a PerplexityTask or an EvalSuite)."""

    settings_class: Callable[[], type]
    build: Callable[[EvalTaskSpec, Path | None, Path | None], object]
    extra_fields: tuple[str, ...] = ()  # YAML fields that are not dataclass fields (e.g. perplexity's `text`)


def _perplexity(spec: EvalTaskSpec, data_dir: Path | None, work_dir: Path | None) -> PerplexityTask:
    from gisp.data.recipes import text_source

    f = spec.fields
    return PerplexityTask(metric=spec.name, source=text_source(f.get("text")), seq_len=f.get("seq_len", 128),
                          max_windows=f.get("max_windows"), batch_size=f.get("batch_size", 8),
                          variant=f.get("variant", ""))


def _suite(module: str, cls: str) -> EvalKind:
    def settings_class() -> type:
        import importlib

        return getattr(importlib.import_module(module), cls)

    def build(spec: EvalTaskSpec, data_dir: Path | None, work_dir: Path | None):
        f = spec.fields
        if "tasks" in f:
            f["tasks"] = (f["tasks"],) if isinstance(f["tasks"], str) else tuple(f["tasks"] or ())
        try:
            return settings_class()(**f, data_dir=data_dir, work_dir=(work_dir / spec.name) if work_dir else None)
        except TypeError as e:
            raise GispError(f"eval task {spec.name!r}: {e}; see conf/eval/*.yaml for the fields") from None

    return EvalKind(settings_class, build)


EVAL_KINDS: dict[str, EvalKind] = {
    "perplexity": EvalKind(lambda: PerplexityTask, _perplexity, extra_fields=("text",)),
    "multiple_choice": _suite("gisp.eval.multiple_choice", "MultipleChoiceSuite"),
    "gsm8k": _suite("gisp.eval.gsm8k", "GSM8KTask"),
    "lm_eval": _suite("gisp.eval.lm_eval_tasks", "LmEvalTasks"),
}


def eval_task_spec(name: str, node: dict) -> EvalTaskSpec:
    """Check one `eval.tasks` entry without loading anything: a known kind and only fields that kind has."""
    node = dict(node)
    kind = node.pop("kind", "perplexity")
    if kind not in EVAL_KINDS:
        raise GispError(f"eval task {name!r}: unknown kind {kind!r}; use one of {sorted(EVAL_KINDS)}")
    entry = EVAL_KINDS[kind]
    allowed = {f.name for f in fields(entry.settings_class()) if f.init} | set(entry.extra_fields)
    unknown = sorted(set(node) - allowed - {"data_dir", "work_dir"})
    if unknown or {"data_dir", "work_dir"} & set(node):
        raise GispError(f"eval task {name!r} (kind {kind}): unknown field(s) {unknown or ['data_dir/work_dir']}; "
                        f"its fields are {sorted(allowed - {'data_dir', 'work_dir', 'metric', 'source'})}")
    if kind == "perplexity" and not node.get("text"):
        raise GispError(f"eval task {name!r}: a perplexity task needs `text` (a text source, see "
                        "conf/eval/wikitext2.yaml)")
    return EvalTaskSpec(name, kind, tuple(sorted(node.items())))


def eval_task_specs(node: dict | None) -> tuple[EvalTaskSpec, ...]:
    """The `eval` group of a command's config (`tasks: {name: {kind: ..., ...}}`, plain values) as checked specs."""
    tasks = (node or {}).get("tasks") or {}
    return tuple(eval_task_spec(name, fields) for name, fields in tasks.items())


def build_suites(tasks: list[EvalTaskSpec] | tuple[EvalTaskSpec, ...], data_dir: Path | None,
                 work_dir: Path | None = None) -> dict[str, EvalSuite]:
    """The suites of `tasks` (everything but perplexity), built without the model: their settings, task names and
    local data are checked here, so a command can refuse them before it loads any weights."""
    return {spec.name: EVAL_KINDS[spec.kind].build(spec, data_dir, work_dir) for spec in tasks
            if spec.kind != "perplexity"}


def build_evaluator(tasks: list[EvalTaskSpec] | tuple[EvalTaskSpec, ...], tokenizer, data_dir: Path | None,
                    work_dir: Path | None = None, max_positions: int | None = None,
                    suites: dict[str, EvalSuite] | None = None) -> Evaluator | None:
    """The suite of `tasks` (None when there is nothing to evaluate). Local data are checked and prepared here,
    once, so every sparsity level is scored on the same items. `suites`: already built by `build_suites`."""
    suites = build_suites(tasks, data_dir, work_dir) if suites is None else suites
    ppl_tasks = [EVAL_KINDS[spec.kind].build(spec, data_dir, work_dir) for spec in tasks if spec.kind == "perplexity"]
    if not ppl_tasks and not suites:
        return None
    return Evaluator(ppl_tasks, tokenizer, data_dir, suites=suites, max_positions=max_positions)
