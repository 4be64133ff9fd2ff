"""Text sources, calibration windows and evaluation windows.

One loader per data set (:func:`load_text`) returns the same text whichever source it comes from: the hub
(``datasets.load_dataset``, what users have) or a local directory (offline copies, see
``../shared/data/MANIFEST.md``). The provenance dict it returns is meant to be stored with every result, so a
number can always be traced back to the exact text it was computed on.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gisp.errors import GispError
from gisp.hub import OFFLINE_VARS, hub_offline, load_hub_dataset  # load_hub_dataset: also re-exported from here
from gisp.io import read_jsonl, read_text
from gisp.models.byte_tokenizer import byte_level_fingerprint, encode_bytes

logger = logging.getLogger(__name__)

ENV_DATA_DIR = "GISP_DATA_DIR"
SOURCES = ("hub", "local", "auto")


def choose_source(source: str, local_present: bool, what: str, fix: str) -> str:
    """"local" or "hub" for ``source`` ("hub" | "local" | "auto"): auto means local when the local copy is present.

    Hub while the hub is offline (:func:`gisp.hub.hub_offline`) raises a GispError that names ``what`` and ``fix``.
    ``source="local"`` is returned as is even when the files are missing: the caller names the missing files.
    """
    if source not in SOURCES:
        raise GispError(f"{what}: unknown source {source!r}; use one of {list(SOURCES)}")
    chosen = source if source != "auto" else ("local" if local_present else "hub")
    if chosen == "hub" and hub_offline():
        why = "no local copy found" if not local_present else f"source={source!r} requested"
        raise GispError(f"{what}: {why} and the hub is offline ({'/'.join(OFFLINE_VARS)}). {fix}")
    return chosen


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """Local data directory: explicit argument, else ``$GISP_DATA_DIR``, else ``<repo>/../shared/data``.

    Returns None when none of them exists (hub-only use); an explicit or env path that does not exist is
    returned anyway so that the "file missing" error can name it.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    return default if default.is_dir() else None


@dataclass(frozen=True)
class TextSource:
    """Where a text comes from; the same record whether it is read from the hub or from local files."""

    name: str  # "austen", "wikitext2_test", "c4", "local_text", ...
    source: str = "auto"  # "hub" | "local" | "auto" (local if the local files exist, else hub)
    local_files: tuple[str, ...] = ()  # relative to data_dir (or absolute); .txt whole text, .jsonl text_field/line
    hub_path: str | None = None  # datasets.load_dataset path, e.g. "allenai/c4" or "wikitext"
    hub_name: str | None = None  # e.g. "wikitext-2-raw-v1"
    hub_split: str = "train"
    hub_data_files: str | None = None  # e.g. "en/c4-train.00000-of-01024.json.gz"
    text_field: str = "text"
    join: str = "\n\n"  # separator between records / documents / files
    max_documents: int | None = None  # take only the first N records (C4 is huge)
    # Local .txt files in the original ``wiki.*.raw`` layout (blank rows are " "): rebuild the HF rows
    # (line + "\n" if non-blank else "") so the text equals "\n\n".join(load_dataset(...)["text"]).
    wikitext_rows: bool = False


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _local_paths(src: TextSource, data_dir: Path | None) -> list[Path]:
    """Resolve ``local_files``: absolute paths as they are, relative ones against ``data_dir``."""
    paths = []
    for f in src.local_files:
        p = Path(f).expanduser()
        if not p.is_absolute():
            if data_dir is None:
                raise GispError(
                    f"data source {src.name!r}: local file {f!r} is relative but no data directory is set; "
                    f"set {ENV_DATA_DIR}=/path/to/data or pass data_dir=..., or use the hub (source=hub)"
                )
            p = Path(data_dir) / p
        paths.append(p)
    return paths


def _wikitext_rows_text(raw: str, join: str) -> str:
    """Rebuild HF wikitext rows from the ``wiki.*.raw`` layout (MANIFEST §1b) and join them."""
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    return join.join(rows)


def _read_local(src: TextSource, paths: list[Path]) -> str:
    """Read .txt (whole text) and .jsonl (``text_field`` per line) files, joined with ``src.join``."""
    parts: list[str] = []
    for p in paths:
        if p.suffix == ".jsonl":
            records = read_jsonl(p, (src.text_field,), f"; data source {src.name!r}: set text_field to one of them")
            parts.extend(str(rec[src.text_field]) for rec in records)
        elif p.suffix == ".txt":
            raw = read_text(p)
            parts.append(_wikitext_rows_text(raw, src.join) if src.wikitext_rows else raw)
        else:
            raise GispError(
                f"data source {src.name!r}: unsupported local file type {p.name!r}; use .txt (whole text) or "
                f".jsonl (one JSON record per line with field {src.text_field!r})"
            )
    if src.max_documents is not None:
        parts = parts[: src.max_documents]
    return src.join.join(parts)


def _hub_id(src: TextSource) -> str:
    return f"{src.hub_path}/{src.hub_name}:{src.hub_split}" if src.hub_name else f"{src.hub_path}:{src.hub_split}"


_HUB_FIX = ("If you are offline, use a local source instead, e.g. data=austen for calibration, or source=local with "
            f"{ENV_DATA_DIR} pointing at the local data")


def _read_hub(src: TextSource) -> str:
    """``datasets.load_dataset`` the records and join their ``text_field`` (wikitext: the standard join)."""
    if not src.hub_path:
        raise GispError(
            f"data source {src.name!r} has no hub_path; set hub_path (e.g. 'wikitext') or use local files "
            f"(source=local with local_files=[...])"
        )
    kwargs: dict[str, Any] = {"split": src.hub_split}
    if src.hub_data_files is not None:
        kwargs["data_files"] = src.hub_data_files
    ds = load_hub_dataset(f"data source {src.name!r}", src.hub_path, src.hub_name, _HUB_FIX, **kwargs)
    if src.max_documents is not None:
        ds = ds.select(range(min(src.max_documents, len(ds))))
    if src.text_field not in ds.column_names:
        raise GispError(
            f"data source {src.name!r}: {_hub_id(src)} has no column {src.text_field!r} "
            f"(columns: {ds.column_names}); set text_field to one of them"
        )
    return src.join.join(ds[src.text_field])


def load_text(src: TextSource, data_dir: Path | None) -> tuple[str, dict]:
    """Full text of ``src`` and its provenance ``{name, source, files|hub, chars, sha256}`` for the results."""
    if src.source not in SOURCES:
        raise GispError(f"data source {src.name!r}: unknown source {src.source!r}; use one of {list(SOURCES)}")
    data_dir = Path(data_dir) if data_dir is not None else None
    try:
        present = bool(src.local_files) and all(p.is_file() for p in _local_paths(src, data_dir))
    except GispError:  # relative files and no data directory
        present = False
    if not src.hub_path and src.source != "local":
        # No hub to choose: auto reports the missing local files, hub reports the missing hub_path.
        use_local = src.source == "auto"
    else:
        use_local = choose_source(src.source, present, f"data source {src.name!r} (hub {_hub_id(src)})",
                                  _HUB_FIX) == "local"
    prov: dict[str, Any] = {"name": src.name}
    if use_local:
        if not src.local_files:
            raise GispError(
                f"data source {src.name!r}: source=local but no local_files are given; list them "
                f"(relative to the data directory) or use the hub (source=hub)"
            )
        paths = _local_paths(src, data_dir)
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise GispError(
                f"data source {src.name!r}: local file(s) not found: {missing} (data_dir={data_dir}); "
                f"set {ENV_DATA_DIR}=/path/to/data or pass data_dir=... to the directory that holds them, "
                f"or use the hub (source=hub)"
            )
        text = _read_local(src, paths)
        prov.update(source="local", files=list(src.local_files), data_dir=str(data_dir) if data_dir else None)
        if src.wikitext_rows:
            prov["layout"] = "wikitext_rows"
    else:
        text = _read_hub(src)
        prov.update(source="hub", hub=_hub_id(src))
        if src.hub_data_files is not None:
            prov["data_files"] = src.hub_data_files
    if src.max_documents is not None:
        prov["max_documents"] = src.max_documents
    prov.update(chars=len(text), sha256=_sha256(text))
    logger.info("loaded text %s from %s: %d chars", src.name, prov["source"], len(text))
    return text, prov


_STREAMS: dict[tuple[str, str, bool], torch.Tensor] = {}  # (text sha256, tokenizer sha256, specials) -> ids
_STREAMS_KEPT = 4


def _tokenizer_sha256(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()


def tokenize_stream(text: str, tokenizer, add_special_tokens: bool) -> torch.Tensor:
    """Tokenize the whole text once: (n_tokens,) int64. One call keeps BPE merges exact at every position.

    The last few streams are kept in memory, keyed by the text's and the tokenizer's content: the jobs of a sweep
    run in one process (and the tests) tokenize the same 4 M characters of calibration text once, not per job."""
    fingerprint = _tokenizer_sha256(tokenizer)
    key = (_sha256(text), fingerprint, add_special_tokens)
    if key not in _STREAMS:
        # the tiny models' byte-level tokenizer: its ids are the text's bytes (the tests check it is exact)
        ids = encode_bytes(text) if fingerprint == byte_level_fingerprint() else None
        if ids is None:
            # verbose=False: silences "sequence length is longer than the maximum" (we cut windows ourselves).
            ids = tokenizer(text, add_special_tokens=add_special_tokens, return_tensors="pt", verbose=False)[
                "input_ids"][0].to(torch.int64)
        while len(_STREAMS) >= _STREAMS_KEPT:
            _STREAMS.pop(next(iter(_STREAMS)))
        _STREAMS[key] = ids  # (n_tokens,)
    return _STREAMS[key].clone()


def calibration_windows(text: str, tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens (SparseGPT/C4 style): (n_samples, seq_len) int64.

    The text is tokenized once without special tokens; starts are drawn uniformly from
    [0, n_tokens - seq_len - 1] (as SparseGPT's ``randint(0, n - seq_len - 1)``) with a seeded generator,
    so the same seed gives the same windows on every machine.
    """
    if n_samples < 1:
        raise GispError(f"calibration needs at least one sample, got n_samples={n_samples}; set data.n_samples >= 1")
    if seq_len < 1:
        raise GispError(f"calibration window length must be positive, got seq_len={seq_len}; set data.seq_len >= 1")
    ids = tokenize_stream(text, tokenizer, add_special_tokens=False)  # (n_tokens,)
    n_tokens = ids.numel()
    if n_tokens < seq_len + 1:
        raise GispError(
            f"calibration text has {n_tokens} tokens, one window needs seq_len={seq_len} (+1); "
            f"use a longer source or a smaller data.seq_len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n_tokens - seq_len, (n_samples,), generator=gen)  # (n_samples,)
    offsets = torch.arange(seq_len)  # (seq_len,)
    return ids[starts[:, None] + offsets[None, :]]  # (n_samples, seq_len)


def eval_windows(text: str, tokenizer, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seq_len`` windows of the token stream, remainder dropped: (n_windows, seq_len).

    The reference perplexity protocol (SparseGPT/Wanda): tokenize the joined text once with the tokenizer's
    default special tokens, cut consecutive windows; ``max_windows`` keeps only the first ones.
    """
    ids = tokenize_stream(text, tokenizer, add_special_tokens=True)  # (n_tokens,)
    return windows_from_stream(ids, seq_len, max_windows)


def windows_from_stream(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a (n_tokens,) stream into (n_windows, seq_len) consecutive windows, at most ``max_windows``."""
    if seq_len < 2:
        raise GispError(f"evaluation windows need seq_len >= 2 (one predicted token), got {seq_len}; raise seq_len")
    if max_windows is not None and max_windows < 1:
        raise GispError(f"max_windows must be >= 1 or None (all windows), got {max_windows}")
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)  # (n_windows, seq_len)
