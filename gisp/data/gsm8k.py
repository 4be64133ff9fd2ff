"""GSM8K records: task-aligned calibration pairs (train split) and the test split that is evaluated.

The same records come from the hub (``openai/gsm8k``, config ``main``) or from the official jsonl files in the local
data directory (``gsm8k/{train,test}.jsonl``, MANIFEST §2); ``source="auto"`` prefers the local files. The 8-shot
exact-match evaluation through lm-eval is :mod:`gisp.eval.gsm8k`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from gisp.data.sources import ENV_DATA_DIR, SOURCES, choose_source, load_hub_dataset, resolve_data_dir
from gisp.errors import GispError
from gisp.io import file_sha256, read_jsonl

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Q: {question}\nA: "
"""Calibration prompt (method.md); the loss is taken on the gold solution that follows it."""

PARTS = {"calibration": "train", "evaluation": "test"}
HUB_PATH, HUB_NAME = "openai/gsm8k", "main"
LOCAL_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
FIELDS = ("question", "answer")


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


def _hub_fix(splits: tuple[str, ...]) -> str:
    files = ", ".join(LOCAL_FILES[s] for s in splits)
    return (f"Connect to the network, or use the local files (source=local with {ENV_DATA_DIR}=/path/to/data or "
            f"data_dir=... holding {files})")


def _read_hub(split: str) -> list[dict]:
    ds = load_hub_dataset(f"GSM8K {split} split", HUB_PATH, HUB_NAME, _hub_fix((split,)), split=split)
    return [{f: row[f] for f in FIELDS} for row in ds]


def resolve_source(splits: tuple[str, ...], data_dir: str | Path | None, source: str) -> str:
    """"local" or "hub": auto means local when every needed local file exists; hub while offline raises."""
    _check_source(source)
    present = all(p is not None and p.is_file() for p in (local_path(s, data_dir) for s in splits))
    return choose_source(source, present, f"GSM8K {'/'.join(splits)} split", _hub_fix(splits))


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
