"""GSM8K 8-shot exact match of the live model through lm-eval (test split; few-shot examples from train).

Evaluation is lm-eval's own ``gsm8k`` task (hub) or ``gisp/eval/tasks/gisp_gsm8k.yaml`` (local), which is that task
with a local data source, so both score the same prompts with the same filters and metric. The records and their
source (hub or local files) are :mod:`gisp.data.gsm8k`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gisp.data.gsm8k import (
    HUB_NAME,
    HUB_PATH,
    LOCAL_FILES,
    _check_source,
    _missing_error,
    _read_hub,
    local_path,
    resolve_source,
)
from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval import harness
from gisp.io import file_sha256

TASK_YAML = Path(__file__).resolve().parent / "tasks" / "gisp_gsm8k.yaml"
METRICS = {"strict-match": "gsm8k_exact_match_strict", "flexible-extract": "gsm8k_exact_match_flexible"}
"""lm-eval filter name -> the flat metric name gisp reports (fraction of questions answered exactly)."""


def lm_eval_gsm8k_yaml() -> Path:
    """lm-eval's installed ``tasks/gsm8k/gsm8k.yaml`` (the hub task gisp runs and mirrors)."""
    return harness.installed_task_yaml("gsm8k/gsm8k.yaml")


def task_config(
    source: str,
    data_dir: str | Path | None = None,
    *,
    num_fewshot: int = 8,
    max_gen_toks: int = 256,
    cache_dir: str | Path | None = None,
) -> dict:
    """The lm-eval task config dict that :class:`GSM8KTask` runs.

    hub: lm-eval's installed ``gsm8k.yaml``; local: ``gisp_gsm8k.yaml`` with absolute data file paths (and the
    datasets cache in ``cache_dir`` if given). Both with ``num_fewshot`` and ``generation_kwargs.max_gen_toks``.
    """
    _check_source(source)
    if source == "hub":
        cfg = harness.load_task_yaml(lm_eval_gsm8k_yaml(), resolve_func=True)
    else:
        cfg = harness.load_task_yaml(TASK_YAML, resolve_func=True)
        root = resolve_data_dir(data_dir)
        files = {}
        for split, rel in cfg["dataset_kwargs"]["data_files"].items():
            path = Path(rel) if Path(rel).is_absolute() or root is None else root / rel
            if not path.is_absolute() or not path.is_file():
                raise _missing_error(split, None if root is None else path)
            files[split] = str(path.resolve())
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": files}
        if cache_dir is not None:
            cfg["dataset_kwargs"]["cache_dir"] = str(cache_dir)
    cfg["num_fewshot"] = num_fewshot
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": max_gen_toks}
    return cfg


@dataclass
class GSM8KTask:
    """GSM8K exact match of a live model (masks included), by lm-eval generation: ``{metric: fraction}``.

    Metrics: ``gsm8k_exact_match_strict`` (the "#### N" the model wrote) and ``gsm8k_exact_match_flexible`` (the
    last number it wrote). Plain-text few-shot prompts, no chat template, as lm-eval's ``gsm8k`` task.
    """

    num_fewshot: int = 8  # the paper: 8-shot
    limit: int | None = None  # first N test questions (quick runs)
    batch_size: int = 8
    max_gen_toks: int = 256
    source: str = "auto"
    seed: int = 1234  # few-shot sampling seed
    data_dir: Path | None = None
    work_dir: Path | None = None  # datasets' cache of the local jsonl (a temporary dir per call if None)
    _source: str = field(init=False, repr=False, default="")
    _files: dict = field(init=False, repr=False, default_factory=dict)
    _n_evaluated: int | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        """Validate everything that does not need the model, so that a bad setting fails before model work."""
        checks = [
            (isinstance(self.num_fewshot, int) and self.num_fewshot >= 0, f"num_fewshot={self.num_fewshot}", ">= 0"),
            (self.limit is None or (isinstance(self.limit, int) and self.limit >= 1), f"limit={self.limit}",
             ">= 1 or None (all 1319 test questions)"),
            (self.batch_size >= 1, f"batch_size={self.batch_size}", ">= 1"),
            (self.max_gen_toks >= 1, f"max_gen_toks={self.max_gen_toks}", ">= 1"),
        ]
        for ok, got, want in checks:
            if not ok:
                raise GispError(f"GSM8K evaluation: invalid {got}; set it {want}")
        self._source = resolve_source(tuple(LOCAL_FILES), self.data_dir, self.source)
        if self._source == "local":
            for split, rel in LOCAL_FILES.items():
                path = local_path(split, self.data_dir)
                if path is None or not path.is_file():
                    raise _missing_error(split, path)
                self._files[split] = {"file": rel, "path": str(path.resolve()), "sha256": file_sha256(path)}

    @property
    def task_name(self) -> str:
        return "gsm8k" if self._source == "hub" else "gisp_gsm8k"

    def __call__(self, model, tokenizer, progress: bool = True) -> dict[str, float]:
        """Run the evaluation on ``model`` as it is now. ``progress`` is not forwarded: lm-eval draws its own bars."""
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise GispError(
                "GSM8K evaluation needs a tokenizer with an eos_token (lm-eval stops generation and pads with it); "
                "pass the model's own tokenizer or set tokenizer.eos_token"
            )
        if self._source == "hub":
            _read_hub("test")  # a clear GispError when offline, before lm-eval fails deep inside
        with tempfile.TemporaryDirectory(prefix="gisp_gsm8k_", ignore_cleanup_errors=True) as tmp:
            cache = self.work_dir if self.work_dir is not None else tmp
            cfg = task_config(self._source, self.data_dir, num_fewshot=self.num_fewshot,
                              max_gen_toks=self.max_gen_toks, cache_dir=cache)
            results, n_samples = harness.evaluate_tasks(model, tokenizer, [cfg], num_fewshot=self.num_fewshot,
                                                limit=self.limit, batch_size=self.batch_size, seed=self.seed,
                                                progress=progress)
        res = results.get(self.task_name)
        if res is None:  # non-zero rank of a distributed run: lm-eval reports on rank 0 only
            return {}
        self._n_evaluated = int(n_samples.get(self.task_name, {}).get("effective", 0)) or None
        out = {metric: float(res[f"exact_match,{flt}"]) for flt, metric in METRICS.items()}
        for flt, metric in METRICS.items():  # lm-eval's standard error over the questions, when it gives one
            stderr = res.get(f"exact_match_stderr,{flt}")
            if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) and math.isfinite(stderr):
                out[f"{metric}_stderr"] = float(stderr)
        return out

    def describe(self) -> dict:
        """Provenance for results.json: data, prompt setting, filters and the lm-eval version."""
        cfg_path = lm_eval_gsm8k_yaml() if self._source == "hub" else TASK_YAML
        filters = {f["name"]: f["filter"][0].get("regex_pattern")
                   for f in harness.load_task_yaml(cfg_path)["filter_list"]}
        out: dict[str, Any] = {
            "dataset": "gsm8k",
            "source": self._source,
            "task": self.task_name,
            "task_config": str(cfg_path),
            "split": "test",
            "fewshot_split": "train",
            "num_fewshot": self.num_fewshot,
            "fewshot_seed": self.seed,
            "limit": self.limit,
            "n_evaluated": self._n_evaluated,
            "max_gen_toks": self.max_gen_toks,
            "chat_template": False,
            "filters": filters,
            "metrics": dict(METRICS),
            "lm_eval_version": harness.lm_eval_version(),
        }
        if self._source == "hub":
            out["hub"] = f"{HUB_PATH}/{HUB_NAME}"
        else:
            out["files"] = {s: {"file": f["file"], "sha256": f["sha256"]} for s, f in self._files.items()}
            out["data_dir"] = str(Path(self._files["test"]["path"]).parent.parent)
        return out


