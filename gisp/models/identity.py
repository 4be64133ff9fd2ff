"""What identifies a model's weights, so that a trajectory is never reused for other weights behind the same name.

- a local folder or GGUF file (`model=hf model.path=...`): a content fingerprint of its files;
- a hub id: the commit its revision resolves to (a pinned commit hash stays itself; a branch or tag is resolved, from
  the local cache when the hub is offline);
- packaged and random models (`gguf_package`, `gguf_parts`, `random`): none here, their definition pins them already
  (a package version and file, a joined file's sha256, a seed and config).

The fingerprint of a file is the sha256 of its size and of what it holds at fixed places: the first and the last
MiB (a safetensors file's header with every tensor's name, dtype, shape and offset; a GGUF file's metadata) and 64
blocks of 64 KiB spread evenly over the rest. About 6 MiB are read per file whatever its size, so a 70B folder (30
files of 5 GB) is fingerprinted in well under a second from a local disk, where a full sha256 would read 140 GB
(minutes). Re-saving a model with other weights (a fine-tune, another checkpoint, another quantization) changes the
header and every sampled block; an edit confined to bytes between the sampled blocks would go unnoticed, which is the
price of not reading a 70B twice. Small files (config, tokenizer: under 8 MiB) are hashed whole.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from gisp.errors import GispError
from gisp.models.spec import ModelSpec

log = logging.getLogger(__name__)

EDGE = 1 << 20  # bytes read at the start and at the end of a large file
BLOCK = 1 << 16  # bytes per sampled block
BLOCKS = 64  # sampled blocks between the edges
WHOLE = 8 << 20  # files up to this size are hashed whole
# The files of a save_pretrained folder that define the model (weights, config, tokenizer); others (READMEs,
# training logs, optimizer states) do not.
FOLDER_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "config.json", "generation_config.json", "tokenizer*",
                "special_tokens_map.json", "vocab.*", "merges.txt", "*.model", "*.tiktoken")
KIND = "sampled-sha256/v1"


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's size and of its edges and sampled blocks (the whole file when it is small)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= WHOLE:
            h.update(f.read())
            return h.hexdigest()
        h.update(f.read(EDGE))
        span = size - 2 * EDGE - BLOCK
        for k in range(BLOCKS):
            f.seek(EDGE + span * k // (BLOCKS - 1))
            h.update(f.read(BLOCK))
        f.seek(size - EDGE)
        h.update(f.read(EDGE))
    return h.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    found = {p for pattern in FOLDER_FILES for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def content_identity(paths: list[Path], root: Path) -> dict[str, Any]:
    files = {str(p.relative_to(root)): file_fingerprint(p) for p in paths}
    digest = hashlib.sha256("".join(f"{name}:{h}\n" for name, h in sorted(files.items())).encode()).hexdigest()
    return {"kind": KIND, "digest": digest, "files": len(files)}


def hub_commit(spec: ModelSpec) -> str | None:
    """The commit `spec.revision` (default: main) resolves to, or None when the hub and its cache cannot say."""
    from gisp.hub import hub_offline

    revision = spec.revision or "main"
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    try:
        if hub_offline():
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec.path, revision=revision, local_files_only=True)).name
        from huggingface_hub import HfApi

        return HfApi().model_info(spec.path, revision=revision).sha
    except Exception as e:  # noqa: BLE001 (network, auth, offline miss: loading reports those with their fix)
        log.debug("no commit for %s@%s: %s", spec.path, revision, e)
        return None


def model_identity(spec: ModelSpec) -> dict[str, Any] | None:
    """What identifies `spec`'s weights beyond its settings (None: the settings pin them already)."""
    if spec.source == "local":
        folder = Path(spec.path).expanduser()
        files = folder_files(folder)
        if not files:
            raise GispError(f"Model '{spec.name}': {folder} holds no model files (config.json, *.safetensors, ...): "
                            "check model.path")
        return content_identity(files, folder)
    if spec.source == "gguf_file":
        path = Path(spec.path).expanduser()
        return content_identity([path], path.parent)
    if spec.source == "hub":
        commit = hub_commit(spec)
        return {"kind": "hub-commit", "commit": commit} if commit else None
    return None
