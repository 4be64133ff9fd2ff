"""A model saved with `save_pretrained` in a local folder: found, checked and loaded, every failure one GispError."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from gisp.errors import GispError
from gisp.models.spec import ModelSpec, first_line


def model_kwargs(spec: ModelSpec, torch_dtype: torch.dtype) -> dict:
    """Keyword arguments shared by every ``from_pretrained``/``from_config`` call."""
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    return kwargs


def local_folder(spec: ModelSpec) -> Path:
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
    with folder_errors(spec, folder):
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=spec.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, **model_kwargs(spec, torch_dtype)
        )
    return model, tokenizer


@contextmanager
def folder_errors(spec: ModelSpec, folder: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError) as exc:
        raise GispError(
            f"Model '{spec.name}': could not load a model from '{folder}' ({type(exc).__name__}: "
            f"{first_line(exc)}). Fix: the folder needs config.json, weights and tokenizer files as written by "
            f"save_pretrained; delete it if it is a broken gisp cache entry."
        ) from exc
