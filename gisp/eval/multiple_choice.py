"""Zero-shot multiple-choice accuracy (the seven CMQA tasks, MedQA) of the live model through lm-eval.

Hub: lm-eval's own tasks (``boolq``, ..., ``medqa_4options``). Offline: gisp's task YAMLs (``gisp/eval/tasks``,
lm-eval's prompts and metrics) over the local *evaluation* parts (:mod:`gisp.data.multiple_choice`), written once as
jsonl files.
Reported per task is lm-eval's ``acc`` for BoolQ and WinoGrande and ``acc_norm`` for the others, as fractions.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gisp.data.multiple_choice import (
    CMQA_TASKS,
    MC_TASKS,
    lm_eval_yaml,
    load_docs,
    load_task_config,
    resolve_source,
    task_spec,
)
from gisp.data.sources import SOURCES
from gisp.errors import GispError
from gisp.eval import harness
from gisp.io import write_jsonl_atomic

logger = logging.getLogger(__name__)

MEAN_RULE = ("cmqa_mean: mean of the seven CMQA metrics, reported only when all seven are evaluated (MedQA never "
             "enters it); otherwise mc_mean: mean over the evaluated tasks, reported when there are two or more")


def metric_key(task: str) -> str:
    """The flat result name of ``task``: ``boolq_acc``, ``piqa_acc_norm``, ..., ``medqa_acc_norm``."""
    return f"{task}_{task_spec(task).metric}"


@dataclass
class MultipleChoiceSuite:
    """``suite(model, tokenizer) -> {"boolq_acc": 0.62, ..., "cmqa_mean": 0.45}`` on the model as it is now.

    Everything that can fail without the model (task names, source, data, limit) fails at construction. The
    model is used in place (pruning hooks stay active) and its train/eval mode is restored afterwards.
    """

    tasks: tuple[str, ...] = CMQA_TASKS
    source: str = "auto"  # auto | hub | local
    limit: int | None = None  # lm-eval limit per task (first N docs; local eval parts are already a seeded shuffle)
    batch_size: int = 8
    num_fewshot: int = 0
    split_seed: int = 1234
    data_dir: Path | None = None
    work_dir: Path | None = None  # where the local eval jsonl files are written (a temp dir if None)
    _specs: dict[str, Any] = field(init=False, repr=False, default_factory=dict)  # task -> lm-eval name or config
    _prov: dict[str, dict] = field(init=False, repr=False, default_factory=dict)
    _n_evaluated: dict[str, int] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.prepare()

    def _validate(self) -> None:
        self.tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in MC_TASKS]
        if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise GispError(f"multiple-choice tasks {list(self.tasks)}: unknown {unknown} or empty/duplicated; "
                            f"choose distinct names from {list(MC_TASKS)}")
        if self.source not in SOURCES:
            raise GispError(f"multiple-choice source {self.source!r} is unknown; use one of {list(SOURCES)}")
        checks = [
            (self.limit is None or (isinstance(self.limit, int) and self.limit >= 1), f"limit={self.limit}",
             "an int >= 1, or None for every document"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size={self.batch_size}", ">= 1"),
            (isinstance(self.num_fewshot, int) and self.num_fewshot >= 0, f"num_fewshot={self.num_fewshot}", ">= 0"),
        ]
        for ok, got, want in checks:
            if not ok:
                raise GispError(f"multiple-choice evaluation: invalid {got}; set it to {want}")

    def prepare(self) -> None:
        """Validate, then resolve every task's data: local parts become jsonl files and lm-eval config dicts."""
        self._validate()
        sources = {t: resolve_source(t, "evaluation", self.data_dir, self.source) for t in self.tasks}
        if "local" in sources.values() and self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="gisp_mc_"))
            weakref.finalize(self, shutil.rmtree, self.work_dir, True)
        for task, src in sources.items():
            if src == "hub":
                cfg = load_task_config(lm_eval_yaml(task))
                self._specs[task] = task_spec(task).lm_eval_task
                hub = cfg["dataset_path"] + (f"/{cfg['dataset_name']}" if cfg.get("dataset_name") else "")
                self._prov[task] = {"source": "hub", "hub": hub, "split": cfg.get("test_split") or
                                    cfg.get("validation_split"), "part": "evaluation"}
            else:
                self._specs[task], self._prov[task] = self._local_config(task)

    def _local_config(self, task: str) -> tuple[dict, dict]:
        work = Path(self.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        docs, prov = load_docs(task, "evaluation", self.data_dir, "local", self.split_seed)
        files = {"test": work / f"{task}_evaluation.jsonl"}
        if self.num_fewshot > 0:  # lm-eval draws few-shot examples from the training split: the calibration part
            files["train"] = work / f"{task}_calibration.jsonl"
            calibration_docs = load_docs(task, "calibration", self.data_dir, "local", self.split_seed)[0]
            write_jsonl_atomic(files["train"], calibration_docs)
        write_jsonl_atomic(files["test"], docs)
        cfg = load_task_config(task_spec(task).gisp_yaml)
        cfg["dataset_kwargs"] = {"data_files": {k: str(p.resolve()) for k, p in files.items()},
                                 "cache_dir": str((work / "hf_datasets").resolve())}
        if self.num_fewshot > 0:
            cfg["training_split"] = "train"
        prov = {k: v for k, v in prov.items() if k not in ("rows", "task", "n")} | {"n_part": prov["n"]}
        return cfg, prov

    def _lm_eval_name(self, task: str) -> str:
        spec = self._specs[task]
        return spec["task"] if isinstance(spec, dict) else spec

    def __call__(self, model, tokenizer, progress: bool = True) -> dict[str, float]:
        """Evaluate ``model`` now; ``{metric_key: fraction}`` plus the mean (see ``MEAN_RULE``).

        ``progress=False`` quiets lm-eval's info logging (its tqdm bars are its own).
        """
        lm_logger = logging.getLogger("lm_eval")
        level = lm_logger.level
        if not progress:
            lm_logger.setLevel(logging.WARNING)
        try:
            specs = [copy.deepcopy(self._specs[t]) for t in self.tasks]  # lm-eval builds fresh Task objects
            results, n_samples = harness.evaluate_tasks(model, tokenizer, specs, num_fewshot=self.num_fewshot,
                                                limit=self.limit, batch_size=self.batch_size, progress=progress)
        finally:
            lm_logger.setLevel(level)
        if not results:  # non-zero rank of a distributed run: lm-eval reports on rank 0 only
            return {}
        out: dict[str, float] = {}
        for task in self.tasks:
            name, metric = self._lm_eval_name(task), task_spec(task).metric
            if name not in results or f"{metric},none" not in results[name]:
                raise GispError(f"lm-eval returned no {metric} for {name} (got {sorted(results)}); check its config")
            out[metric_key(task)] = float(results[name][f"{metric},none"])
            stderr = results[name].get(f"{metric}_stderr,none")  # lm-eval's standard error over the items
            if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and math.isfinite(stderr):
                out[f"{metric_key(task)}_stderr"] = float(stderr)
            self._n_evaluated[task] = int(n_samples.get(name, {}).get("effective", 0))
        keys = [metric_key(t) for t in self.tasks]
        mean = "cmqa_mean" if set(CMQA_TASKS) <= set(self.tasks) else ("mc_mean" if len(keys) >= 2 else None)
        if mean is not None:
            of = [metric_key(t) for t in CMQA_TASKS] if mean == "cmqa_mean" else keys
            out[mean] = sum(out[k] for k in of) / len(of)
            if all(f"{k}_stderr" in out for k in of):  # independent tasks: the mean's error
                out[f"{mean}_stderr"] = math.sqrt(sum(out[f"{k}_stderr"] ** 2 for k in of)) / len(of)
        return out

    def describe(self) -> dict:
        """Provenance for results.json: per task its data, part, documents evaluated and metric."""
        tasks = {}
        for task in self.tasks:
            spec = self._specs[task]
            tasks[task] = {
                **self._prov[task],
                "lm_eval_task": self._lm_eval_name(task),
                "task_config": str(task_spec(task).gisp_yaml if isinstance(spec, dict) else lm_eval_yaml(task)),
                "n_evaluated": self._n_evaluated.get(task),  # lm-eval's effective n of the last call
                "limit": self.limit,
                "metric": task_spec(task).metric,
                "metric_key": metric_key(task),
                "split_seed": self.split_seed,
            }
        return {"kind": "multiple_choice", "tasks": tasks, "num_fewshot": self.num_fewshot,
                "batch_size": self.batch_size, "mean": MEAN_RULE, "lm_eval_version": harness.lm_eval_version()}
