"""File reading and writing in one place. Writes are atomic: a result is either complete or absent, never
half-written (a temporary sibling is written, flushed, then renamed over the target)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from typing_extensions import Self

from gisp.errors import GispError

_log = logging.getLogger("gisp")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# Temporary siblings are named .<name>.<pid>-<host tag>.<random>: a process killed mid-write (SIGKILL, power loss)
# leaves one behind, and the next write to the same path removes those whose writer is gone (same host, dead pid).


@cache
def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{_host_tag()}."


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temporary siblings of `path` left by writers on this host that are no longer running; returns
    what was removed. Temporaries of live writers (another export to the same place right now) are kept."""
    path = Path(path)
    prefix = f".{path.name}."
    pattern = re.compile(r"(\d+)-([0-9a-f]{8})\.")
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if not p.name.startswith(prefix):
            continue
        m = pattern.match(p.name[len(prefix):])
        if m is None or m.group(2) != _host_tag() or _pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        _log.info("removed %s, left by an interrupted write (pid %s)", p, m.group(1))
        removed.append(p)
    return removed


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; when the block succeeds it is renamed over `path`, otherwise
    removed. For writers that want a file name (safetensors, savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
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
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(path: str | Path, what: str, fix: str) -> Path:
    """Refuse (GispError naming `what`, the folder at fault and `fix`) a path that cannot be written: a file where a
    folder is needed, a folder under a file, a read-only or pseudo file system. Probed by making and removing a
    temporary folder in the first existing folder on the way, so nothing is left behind; returns that folder."""
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise GispError(f"{what} {path} cannot be written: {existing} is a file, not a folder; {fix}")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".gisp-write-check-"))
    except OSError as e:
        raise GispError(f"{what} {path} cannot be written ({existing}: {e.strerror}); {fix}") from None
    return existing


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


def read_json(path: str | Path, fix: str = "") -> Any:
    """A JSON file's content; a missing, truncated or invalid file is a GispError naming it (and `fix`)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise GispError(f"{path} does not exist{'; ' + fix if fix else ''}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GispError(f"{path} is not valid JSON ({e}): the file is damaged (truncated or edited)"
                        f"{'; ' + fix if fix else ''}") from None


def read_jsonl(path: str | Path, required: Sequence[str] = (), hint: str = "") -> list[dict]:
    """The records of a jsonl file (blank lines skipped). A line that is not a JSON object, or a binary file, is a
    GispError naming the file and the line; a record without a ``required`` field names the fields it has and adds
    ``hint`` (how to choose the field)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in _lines(fh, path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise GispError(f"{path}:{lineno} is not a JSON record ({e}): fix or remove that line (a .jsonl file "
                                "holds one JSON object per line)") from None
            if not isinstance(rec, dict):
                raise GispError(f"{path}:{lineno} is not a JSON object: fix or remove that line (a .jsonl file holds "
                                "one JSON object per line)")
            missing = [f for f in required if f not in rec]
            if missing:
                raise GispError(f"{path}:{lineno} lacks field(s) {missing} (fields: {sorted(rec)}){hint}")
            records.append(rec)
    return records


def _lines(fh, path):
    try:
        yield from enumerate(fh, 1)
    except UnicodeDecodeError as e:
        raise GispError(f"{path} is not UTF-8 text ({e}): is it a binary file? Give a .txt / .jsonl text "
                        "file") from None


@cache
def _cached_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_sha256(path: str | Path, cached: bool = True) -> str:
    """sha256 of a file's bytes (cached by default: data files are read-only inputs; `cached=False` for files that
    can change, such as a trajectory's)."""
    return _cached_sha256(str(path)) if cached else hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FolderLock:
    """An exclusive lock on a folder: held for the `with` block, released on exit, on an exception and, by the
    operating system, when the holder dies (so a crashed job never blocks the next one).

    The lock is taken on the folder itself (flock on the folder's descriptor), not on a file inside it: a cleanup
    script that deletes lock files cannot let a second writer in. Who holds it (pid, host, since when) is written to
    `<folder>/.gisp.lock`, a file that exists only while the lock is held: deleting it loses only that information.
    Where a file system cannot lock folders (flock over NFS needs a file open for writing), the lock falls back to
    `<folder>/.gisp.flock`, re-checked after locking to be the file at that path (a lock on a file that was deleted
    meanwhile is dropped and taken again); that fallback is logged once.

    While another process holds it, `acquire` waits and logs every `log_every` seconds who holds it; a holder that is
    gone without releasing is named when the lock is taken over.
    """

    HOLDER = ".gisp.lock"
    FALLBACK = ".gisp.flock"

    def __init__(self, folder: str | Path, what: str = "", poll: float = 0.5, log_every: float = 30.0,
                 timeout: float | None = None):
        self.folder = Path(folder)
        self.what = what or str(self.folder)
        self.poll, self.log_every, self.timeout = poll, log_every, timeout
        self._fd: int | None = None

    @property
    def holder_path(self) -> Path:
        return self.folder / self.HOLDER

    def holder(self) -> dict:
        try:
            return json.loads(self.holder_path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _open(self) -> tuple[int, Path | None]:
        """A descriptor to lock: the folder's own, or (file systems that cannot flock folders) the fallback file's."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # probe: can this file system lock a folder at all?
            fcntl.flock(fd, fcntl.LOCK_UN)
            return fd, None
        except BlockingIOError:
            return fd, None  # held exclusively by someone else: folder locks work here
        except OSError:
            os.close(fd)
            _warn_fallback(self.folder)
            path = self.folder / self.FALLBACK
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o666), path

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting while `blocking`, up to `timeout`); False when it was not taken."""
        self.folder.mkdir(parents=True, exist_ok=True)
        started, next_log = time.monotonic(), 0.0
        fd, file = self._open()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if file is None or _same_file(fd, file):
                    break
                os.close(fd)  # the fallback file was deleted or replaced while we waited: lock the one there now
                fd, file = self._open()
                continue
            except BlockingIOError:
                waited = time.monotonic() - started
                if not blocking or (self.timeout is not None and waited > self.timeout):
                    os.close(fd)
                    return False
                if waited >= next_log:  # at once, then every log_every seconds
                    h = self.holder()
                    _log.info("waiting for %s: held by pid %s on %s since %s (%.0f s so far)", self.what,
                              h.get("pid", "?"), h.get("host", "?"), h.get("since", "?"), waited)
                    next_log = waited + self.log_every
                time.sleep(self.poll)
        previous = self.holder()
        host = socket.gethostname()
        if previous.get("pid") and previous.get("host") == host and not _pid_alive(int(previous["pid"])):
            _log.warning("%s: the previous holder (pid %s) is gone without releasing it; taking it over", self.what,
                         previous["pid"])
        info = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "job": os.environ.get("SLURM_JOB_ID")}
        try:
            self.holder_path.write_text(json.dumps(info))
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            self.holder_path.unlink(missing_ok=True)  # no holder: a later reader sees the lock free, not a dead pid
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@cache
def _warn_fallback(folder: Path) -> None:
    _log.warning("%s: this file system cannot lock folders; locking the file %s inside it instead (deleting that "
                 "file while a command runs would let a second command in)", folder, FolderLock.FALLBACK)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's content; a binary or unreadable file is a GispError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GispError(f"{path} is not UTF-8 text ({e}): is it a binary file? Give a .txt / .jsonl text "
                        "file") from None
    except OSError as e:
        raise GispError(f"{path} cannot be read ({e.strerror})") from None
