"""Atomic file writes: a result is either complete or absent, never half-written."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from gisp.errors import GispError


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over `path`."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_jsonl_atomic(path: str | Path, records: Sequence[dict]) -> None:
    """One JSON record per line, written atomically."""
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path: str | Path, required: Sequence[str] = (), hint: str = "") -> list[dict]:
    """The records of a jsonl file (blank lines skipped); a record without a ``required`` field is a GispError
    naming the file, the line, the fields it has and ``hint`` (how to fix it)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [f for f in required if f not in rec]
            if missing:
                raise GispError(f"{path}:{lineno} lacks field(s) {missing} (fields: {sorted(rec)}){hint}")
            records.append(rec)
    return records


@cache
def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (cached: data files are read-only inputs)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
