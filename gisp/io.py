"""File reading and writing in one place. Writes are atomic: a result is either complete or absent, never
half-written (a temporary sibling is written, flushed, then renamed over the target)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from gisp.errors import GispError


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it is renamed over `path`, otherwise
    removed. For writers that want a file name (safetensors, savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new temporary folder next to `path`; when the block succeeds it is renamed to `path` (which must
    not exist), otherwise removed. Files get the usual permissions (mkdtemp makes the folder private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over `path`."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temporary file in the same folder, fsync, then rename over `path`."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


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
