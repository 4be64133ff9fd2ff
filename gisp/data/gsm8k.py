"""GSM8K: task-aligned calibration pairs (train split) and 8-shot exact-match evaluation through lm-eval (test split).

The same records come from the hub (``openai/gsm8k``, config ``main``) or from the official jsonl files in the local
data directory (``gsm8k/{train,test}.jsonl``, MANIFEST §2); ``source="auto"`` prefers the local files. Evaluation is
lm-eval's own ``gsm8k`` task (hub) or ``lm_eval_tasks/gisp_gsm8k.yaml`` (local), which is that task with a local
data source, so both score the same prompts with the same filters and metric.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from gisp.data.sources import ENV_DATA_DIR, SOURCES, load_hub_dataset, resolve_data_dir
from gisp.errors import GispError
from gisp.io import file_sha256, read_jsonl

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Q: {question}\nA: "
"""Calibration prompt (method.md); the loss is taken on the gold solution that follows it."""

PARTS = {"calibration": "train", "evaluation": "test"}
HUB_PATH, HUB_NAME = "openai/gsm8k", "main"
LOCAL_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
FIELDS = ("question", "answer")
TASK_YAML = Path(__file__).resolve().parent.parent / "eval" / "tasks" / "gisp_gsm8k.yaml"
METRICS = {"strict-match": "gsm8k_exact_match_strict", "flexible-extract": "gsm8k_exact_match_flexible"}
"""lm-eval filter name -> the flat metric name gisp reports (fraction of questions answered exactly)."""


def _records_sha256(docs: list[dict]) -> str:
    """Hash of the (question, answer) records, equal for the hub and the local copy of the same split."""
    payload = json.dumps([[d["question"], d["answer"]] for d in docs], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _split_of(part: str) -> str:
    if part not in PARTS:
        raise GispError(f"unknown GSM8K part {part!r}; use one of {list(PARTS)} (train / test split)")
    return PARTS[part]


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise GispError(f"unknown GSM8K source {source!r}; use one of {list(SOURCES)}")


def local_path(split: str, data_dir: str | Path | None) -> Path | None:
    """Path of the local jsonl for ``split`` ("train"/"test"), or None when no data directory is known."""
    root = resolve_data_dir(data_dir)
    return None if root is None else root / LOCAL_FILES[split]


def _missing_error(split: str, path: Path | None) -> GispError:
    where = f"{path} does not exist" if path is not None else "no data directory is set"
    return GispError(
        f"GSM8K {split} split: local file {LOCAL_FILES[split]!r} not found ({where}); set {ENV_DATA_DIR}=/path/to/data "
        f"or pass data_dir=... to the directory that holds gsm8k/, or use the hub (source=hub, needs network)"
    )


def _read_jsonl(path: Path) -> list[dict]:
    hint = f"; GSM8K jsonl records need {list(FIELDS)} as in the official release"
    return [{f: rec[f] for f in FIELDS} for rec in read_jsonl(path, FIELDS, hint)]


def _read_hub(split: str) -> list[dict]:
    ds = load_hub_dataset(f"GSM8K {split} split", HUB_PATH, HUB_NAME,
                          f"Connect to the network, or use the local files (source=local with {ENV_DATA_DIR}="
                          f"/path/to/data or data_dir=... holding {LOCAL_FILES[split]})", split=split)
    return [{f: row[f] for f in FIELDS} for row in ds]


def resolve_source(splits: tuple[str, ...], data_dir: str | Path | None, source: str) -> str:
    """"local" or "hub": auto means local when every needed local file exists."""
    _check_source(source)
    if source != "auto":
        return source
    paths = [local_path(s, data_dir) for s in splits]
    return "local" if all(p is not None and p.is_file() for p in paths) else "hub"


def load_gsm8k(part: str, data_dir: str | Path | None, source: str = "auto") -> tuple[list[dict], dict]:
    """Records ``{question, answer}`` of the train ("calibration") or test ("evaluation") split, and provenance.

    Provenance: ``{dataset, part, split, source, file, sha256 | hub, n, records_sha256}``; ``records_sha256``
    hashes the records themselves, so a local and a hub load of the same split can be compared.
    """
    split = _split_of(part)
    src = resolve_source((split,), data_dir, source)
    prov: dict[str, Any] = {"dataset": "gsm8k", "part": part, "split": split, "source": src}
    if src == "local":
        path = local_path(split, data_dir)
        if path is None or not path.is_file():
            raise _missing_error(split, path)
        docs = _read_jsonl(path)
        prov.update(file=LOCAL_FILES[split], data_dir=str(path.parent.parent), sha256=file_sha256(path))
    else:
        docs = _read_hub(split)
        prov["hub"] = f"{HUB_PATH}/{HUB_NAME}:{split}"
    prov.update(n=len(docs), records_sha256=_records_sha256(docs))
    logger.info("loaded GSM8K %s (%s) from %s: %d records", part, split, src, len(docs))
    return docs, prov


def calibration_pairs(docs: list[dict], n_samples: int, seed: int) -> list[tuple[str, str]]:
    """``n_samples`` (prompt, gold solution) pairs drawn without replacement with a seeded RNG.

    The solution is kept exactly as in the data (calculator annotations ``<<48/2=24>>`` and the ``#### N`` line
    included): the calibration loss is taken on these answer tokens only.
    """
    if n_samples < 1:
        raise GispError(f"GSM8K calibration needs at least one sample, got n_samples={n_samples}; set n_samples >= 1")
    if n_samples > len(docs):
        raise GispError(
            f"GSM8K calibration asks for n_samples={n_samples} but only {len(docs)} records are available; "
            f"set n_samples <= {len(docs)}"
        )
    picked = random.Random(seed).sample(range(len(docs)), n_samples)
    return [(PROMPT_TEMPLATE.format(question=docs[i]["question"]), docs[i]["answer"]) for i in picked]


def final_answer(solution: str) -> str:
    """The gold number after ``#### `` with thousands separators removed, e.g. "1,234" -> "1234"."""
    if "#### " not in solution:
        raise GispError(f"GSM8K solution has no '#### ' final-answer line: {solution[-80:]!r}; pass a gold solution")
    return solution.rsplit("#### ", 1)[1].strip().replace(",", "")


def _lm_eval_version() -> str | None:
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def lm_eval_gsm8k_yaml() -> Path:
    """lm-eval's installed ``tasks/gsm8k/gsm8k.yaml`` (the hub task gisp runs and mirrors)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent / "gsm8k" / "gsm8k.yaml"


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
    from lm_eval.tasks._yaml_loader import load_yaml

    _check_source(source)
    if source == "hub":
        cfg = load_yaml(lm_eval_gsm8k_yaml(), resolve_func=True)
    else:
        cfg = load_yaml(TASK_YAML, resolve_func=True)
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
        from gisp.eval.harness import evaluate_tasks

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
            results, n_samples = evaluate_tasks(model, tokenizer, [cfg], num_fewshot=self.num_fewshot,
                                                limit=self.limit, batch_size=self.batch_size, seed=self.seed,
                                                progress=progress)
        res = results.get(self.task_name)
        if res is None:  # non-zero rank of a distributed run: lm-eval reports on rank 0 only
            return {}
        self._n_evaluated = int(n_samples.get(self.task_name, {}).get("effective", 0)) or None
        return {metric: float(res[f"exact_match,{flt}"]) for flt, metric in METRICS.items()}

    def describe(self) -> dict:
        """Provenance for results.json: data, prompt setting, filters and the lm-eval version."""
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg_path = lm_eval_gsm8k_yaml() if self._source == "hub" else TASK_YAML
        filters = {f["name"]: f["filter"][0].get("regex_pattern") for f in load_yaml(cfg_path)["filter_list"]}
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
            "lm_eval_version": _lm_eval_version(),
        }
        if self._source == "hub":
            out["hub"] = f"{HUB_PATH}/{HUB_NAME}"
        else:
            out["files"] = {s: {"file": f["file"], "sha256": f["sha256"]} for s, f in self._files.items()}
            out["data_dir"] = str(Path(self._files["test"]["path"]).parent.parent)
        return out


