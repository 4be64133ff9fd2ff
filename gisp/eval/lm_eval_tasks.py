"""lm-eval's own tasks, by name, on the live (possibly masked) model: the evaluation kind ``lm_eval``.

``eval=lm_eval eval.tasks.lm_eval.names=[mmlu,arc_easy] eval.tasks.lm_eval.num_fewshot=0`` runs whatever lm-eval
knows by those names (tasks, groups, tags) with lm-eval's prompts, metrics and data. Its built-in tasks read their
data sets from the hub; offline, only tasks registered from local task YAMLs (``include_path=DIR``) whose data are
local files can run, and anything else fails at construction, before any model work (see :data:`OFFLINE_FIX`).

Reported metrics follow :data:`METRIC_RULE`, e.g. ``arc_easy_acc``, ``arc_easy_acc_norm``,
``gsm8k_exact_match_strict_match``.
"""

from __future__ import annotations

import difflib
import glob
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gisp.errors import GispError
from gisp.eval import harness
from gisp.hub import hub_offline

logger = logging.getLogger(__name__)

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
"""``dataset_path`` values that read local ``dataset_kwargs.data_files`` (datasets' packaged builders)."""

OFFLINE_FIX = ("use the offline mirror eval=cmqa (boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, "
               "openbookqa) or eval=gsm8k, or register a local task YAML with eval.tasks.lm_eval.include_path=DIR "
               "(dataset_path: json with absolute data_files)")

METRIC_RULE = ("every task and group lm-eval reports, as {task}_{metric} for its filter 'none' and "
               "{task}_{metric}_{filter} otherwise (runs of non-alphanumeric characters of the filter become '_', "
               "e.g. exact_match,strict-match -> gsm8k_exact_match_strict_match), each with its standard error as "
               "{name}_stderr when lm-eval gives one; with `metrics` ({task: metric or [metrics]}) only the listed "
               "ones (and their errors) are reported")


def metric_name(task: str, key: str) -> str | None:
    """The flat name of lm-eval's result ``key`` (``"acc,none"``, ``"exact_match,strict-match"``) for ``task``; a
    standard error (``"acc_stderr,none"``) is the metric's name + ``_stderr``; None for entries that are not
    metrics (``alias``)."""
    metric, sep, flt = key.partition(",")
    if not sep or not metric:
        return None
    if metric.endswith("_stderr"):
        base = metric_name(task, f"{metric.removesuffix('_stderr')},{flt}")
        return None if base is None else f"{base}_stderr"
    if flt == "none":
        return f"{task}_{metric}"
    return f"{task}_{metric}_{re.sub(r'[^0-9A-Za-z]+', '_', flt).strip('_')}"


def flatten_results(results: dict[str, dict], keep: dict[str, tuple[str, ...]] | None = None) -> dict[str, float]:
    """lm-eval's ``{task: {"acc,none": v, "acc_stderr,none": e, "alias": ...}}`` -> ``{"task_acc": v}`` (see
    :data:`METRIC_RULE`). ``keep``: {task: flat metric suffixes} to report only those (others are dropped)."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        if keep is not None and task not in keep:
            continue
        for key, value in metrics.items():
            name = metric_name(task, key)
            if name is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                continue
            if keep is not None and name[len(task) + 1:].removesuffix("_stderr") not in keep[task]:
                continue
            if name in out:
                raise GispError(f"lm-eval metrics of {task!r} map to the same name {name!r}; report them through "
                                f"`metrics` with distinct names")
            out[name] = float(value)
    if keep is not None:
        missing = [f"{t}_{m}" for t, ms in keep.items() for m in ms if f"{t}_{m}" not in out]
        if missing:
            have = sorted(k for k in flatten_results(results) if not k.endswith("_stderr"))
            raise GispError(f"lm-eval reported no {missing}; set eval `metrics` to reported ones: {have}")
    return out


def _suffix(metric: str) -> str:
    """A `metrics` entry as the flat suffix: "acc" -> "acc", "exact_match,strict-match" ->
    "exact_match_strict_match" (lm-eval's "metric,filter" form or the flat form)."""
    name = metric_name("", metric if "," in metric else f"{metric},none")
    return metric if name is None else name[1:]


def _data_files(files: Any) -> list[str]:
    if isinstance(files, (str, Path)):
        return [str(files)]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _data_files(v)]
    if isinstance(files, (list, tuple)):
        return [f for v in files for f in _data_files(v)]
    return []


def _data_status(cfg: dict) -> tuple[str, str]:
    """("local" | "hub" | "broken", why) for one task config from lm-eval's index."""
    path = cfg.get("dataset_path")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(path, str) and path in LOCAL_BUILDERS:
        listed = _data_files(files)
        if not listed:
            return "broken", f"dataset_path: {path} without dataset_kwargs.data_files; list the data files there"
        for f in listed:
            if not Path(f).expanduser().is_absolute():
                return "broken", (f"data file {f!r} is a relative path (datasets resolves it against the working "
                                  f"directory, not the YAML); make it absolute")
            if not glob.glob(str(Path(f).expanduser())):
                return "broken", f"data file {f} does not exist; write it or fix dataset_kwargs.data_files"
        return "local", f"dataset_path: {path} over local files"
    if isinstance(path, str) and Path(path).expanduser().is_absolute() and Path(path).expanduser().exists():
        return "local", f"dataset_path {path} is a local directory"
    if "class" in cfg:
        return "hub", "a Python task class (gisp cannot tell where its data come from)"
    return "hub", f"dataset_path {path!r} is read from the dataset hub"


def _task_status(name: str, index: dict[str, harness.IndexedTask], seen: frozenset = frozenset(),
                 overrides: dict | None = None) -> tuple[str, str]:
    """Where the data of ``name`` (a task, group or tag of ``index``) come from: the worst of its tasks'."""
    if name in seen:
        return "local", "already checked"
    entry = index[name]
    if entry.kind in ("task", "python_task"):
        return _data_status({**(entry.config or {}), **(overrides or {})})
    members = []
    for item in entry.members:
        if isinstance(item, str):
            members.append((item, None))
        elif isinstance(item, dict):
            ref = item.get("task", item.get("group"))
            members.append((ref, {k: v for k, v in item.items() if k not in ("task", "group")}))
    rank = {"broken": 0, "hub": 1, "local": 2}
    worst = ("local", f"{entry.kind} of local tasks")
    for ref, extra in members:
        if isinstance(ref, str) and ref in index:
            status = _task_status(ref, index, seen | {name}, extra)
        elif extra:  # an inline task of a group
            status = _data_status(extra)
        else:
            status = ("hub", f"member {ref!r} of {entry.kind} {name!r} is not under include_path")
        if rank[status[0]] < rank[worst[0]]:
            worst = (status[0], f"{ref}: {status[1]}")
    return worst


@dataclass
class LmEvalTasks:
    """``tasks(model, tokenizer) -> {"arc_easy_acc": 0.41, "arc_easy_acc_norm": 0.38, ...}`` on the model as it is.

    ``names``: lm-eval task, group or tag names. Tasks found in the YAMLs under ``include_path`` are run from
    there (lm-eval's ``TaskManager(include_path=..., include_defaults=False)`` when every name is found there);
    other names are lm-eval's built-in tasks (hub data). Everything that can fail without the model (settings,
    unknown names, offline hub tasks, missing local data files) fails at construction.
    """

    names: tuple[str, ...] = ()
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None  # first N documents per task
    batch_size: int = 8
    include_path: str | None = None  # a directory of task YAMLs (lm-eval's --include_path)
    metrics: dict | None = None  # {task: metric | [metrics]}: report only these (None: every metric, METRIC_RULE)
    data_dir: Path | None = None  # unused: the data are the tasks' own (same interface as the other kinds)
    work_dir: Path | None = None  # unused: lm-eval's datasets cache is the tasks' dataset_kwargs or HF's
    _sources: dict[str, dict] = field(init=False, repr=False, default_factory=dict)
    _keep: dict[str, tuple[str, ...]] | None = field(init=False, repr=False, default=None)
    _include: str | None = field(init=False, repr=False, default=None)
    _include_defaults: bool = field(init=False, repr=False, default=True)
    _n_evaluated: dict[str, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._validate()
        self._resolve_tasks()

    def _validate(self) -> None:
        names = (self.names,) if isinstance(self.names, str) else tuple(self.names or ())
        if not names or not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != len(names):
            raise GispError(f"lm_eval evaluation: names={list(names)}; give one or more distinct lm-eval task names, "
                            f"e.g. eval.tasks.lm_eval.names=[arc_easy]")
        self.names = names
        checks = [
            (self.num_fewshot is None or (_is_int(self.num_fewshot) and self.num_fewshot >= 0),
             f"num_fewshot={self.num_fewshot}", ">= 0, or null for each task's default"),
            (self.limit is None or (_is_int(self.limit) and self.limit >= 1), f"limit={self.limit}",
             "an int >= 1, or null for every document"),
            (_is_int(self.batch_size) and self.batch_size >= 1, f"batch_size={self.batch_size}", ">= 1"),
        ]
        for ok, got, want in checks:
            if not ok:
                raise GispError(f"lm_eval evaluation: invalid {got}; set it to {want}")
        if self.include_path is not None:
            path = Path(str(self.include_path)).expanduser()
            if not path.is_dir():
                raise GispError(f"lm_eval evaluation: include_path={self.include_path} is not a directory; point it "
                                f"at the directory that holds your task YAMLs")
            self._include = str(path.resolve())
        if self.metrics is not None:
            if not isinstance(self.metrics, dict) or not self.metrics:
                raise GispError(f"lm_eval evaluation: metrics={self.metrics!r}; give {{task: metric or [metrics]}}, "
                                f"e.g. {{arc_easy: acc_norm}}, or null for every metric")
            keep = {}
            for task, wanted in dict(self.metrics).items():
                wanted = [wanted] if isinstance(wanted, str) else list(wanted or ())
                if not wanted or not all(isinstance(m, str) and m for m in wanted):
                    raise GispError(f"lm_eval evaluation: metrics[{task!r}]={wanted!r}; give metric names such as "
                                    f"acc, acc_norm or exact_match,strict-match")
                keep[str(task)] = tuple(_suffix(m) for m in wanted)
            self._keep = keep

    def _resolve_tasks(self) -> None:
        local = harness.task_index(self._include) if self._include else {}
        offline = hub_offline()
        for name in self.names:
            if name in local:
                status, why = _task_status(name, local)
                yaml = local[name].yaml_path
                where = f"{name!r} ({local[name].kind} in {yaml or self._include})"
                if status == "broken":
                    raise GispError(f"lm_eval task {where}: {why}")
                if status == "hub" and offline:
                    raise GispError(f"lm_eval task {where} is not available offline: {why}. Fix: {OFFLINE_FIX}")
                self._sources[name] = {"registered": "include_path", "kind": local[name].kind, "source": status,
                                       "why": why, "yaml": str(yaml) if yaml else None}
            elif offline:
                where = f"under include_path {self._include}" if self._include else "(no include_path set)"
                raise GispError(f"lm_eval task {name!r} is not available offline: it is not a local task {where}, "
                                f"and lm-eval's built-in tasks read their data from the hub, which is offline. "
                                f"Fix: {OFFLINE_FIX}")
            else:
                self._sources[name] = {"registered": "lm_eval", "kind": None, "source": "hub",
                                       "why": "lm-eval built-in (hub data)", "yaml": None}
        # lm-eval's built-ins are indexed too when a name or a group member is one of them (hub data: online only)
        self._include_defaults = any(s["registered"] == "lm_eval" or s["source"] == "hub"
                                     for s in self._sources.values())
        if self._include_defaults:  # names lm-eval itself must know (its full index; cached for the run)
            known = harness.task_index(self._include, include_defaults=True)
            for name, src in self._sources.items():
                if src["registered"] != "lm_eval":
                    continue
                if name not in known:
                    close = difflib.get_close_matches(name, list(known), n=5)
                    raise GispError(f"lm_eval task {name!r} is unknown to lm-eval {harness.lm_eval_version()}"
                                    f"{f' (close: {close})' if close else ''}; use a name from `lm-eval ls tasks`"
                                    f" or a task YAML under include_path")
                src["kind"] = known[name].kind
                src["yaml"] = str(known[name].yaml_path) if known[name].yaml_path else None

    def __call__(self, model, tokenizer, progress: bool = True) -> dict[str, float]:
        """Evaluate ``model`` now: ``{f"{task}_{metric}": value}`` (:data:`METRIC_RULE`).

        ``progress=False`` quiets lm-eval's info logging and its tqdm bars.
        """
        lm_logger = logging.getLogger("lm_eval")
        level = lm_logger.level
        if not progress:
            lm_logger.setLevel(logging.WARNING)
        try:
            results, n_samples = harness.evaluate_tasks(
                model, tokenizer, list(self.names), num_fewshot=self.num_fewshot, limit=self.limit,
                batch_size=self.batch_size, progress=progress, include_path=self._include,
                include_defaults=self._include_defaults)
        finally:
            lm_logger.setLevel(level)
        if not results:  # non-zero rank of a distributed run: lm-eval reports on rank 0 only
            return {}
        self._n_evaluated = {t: int(n.get("effective", 0)) for t, n in n_samples.items()}
        out = flatten_results(results, self._keep)
        bad = sorted(k for k, v in out.items() if not math.isfinite(v))
        if bad:
            logger.warning("lm_eval metrics %s are not finite", bad)
        return out

    def describe(self) -> dict:
        """Provenance for results.json: task names and where their data come from, settings, documents evaluated
        per task (lm-eval's effective n of the last call), the metric naming rule and the lm-eval version."""
        return {
            "kind": "lm_eval",
            "names": list(self.names),
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "include_path": self._include,
            "tasks": {name: dict(src) for name, src in self._sources.items()},
            "n_evaluated": dict(self._n_evaluated),
            "metrics": {t: list(m) for t, m in self._keep.items()} if self._keep is not None else None,
            "metric_names": METRIC_RULE,
            "lm_eval_version": harness.lm_eval_version(),
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
