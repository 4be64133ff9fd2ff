"""The Hugging Face hub, written once: is it offline, and one loader with one error for hub data sets.

Bottom layer: imports only :mod:`gisp.errors` and the standard library (``datasets`` and ``huggingface_hub`` are
imported inside the functions that need them).
"""

from __future__ import annotations

import os
from typing import Any

from gisp.errors import GispError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
"""Environment variables that put the hub offline (any of them set to 1/true/yes/on)."""

_TRUTHY = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the hub must not be used, read at call time.

    True when any of :data:`OFFLINE_VARS` is 1/true/yes/on now, or when ``huggingface_hub`` was imported in offline
    mode (it reads ``HF_HUB_OFFLINE`` once, at import, so the environment alone could miss it).
    """
    if any(os.environ.get(var, "").strip().lower() in _TRUTHY for var in OFFLINE_VARS):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def load_hub_dataset(what: str, path: str, name: str | None, fix: str, **kwargs: Any):
    """``datasets.load_dataset(path, name, **kwargs)``; any hub failure (offline, unknown name, auth) becomes one
    GispError that says what could not be loaded and `fix`."""
    import datasets  # heavy import, only when the hub is used

    try:
        return datasets.load_dataset(path, name, **kwargs)
    except Exception as exc:
        hub_id = f"{path}/{name}" if name else path
        raise GispError(f"{what}: could not load {hub_id} ({kwargs.get('split')}) from the dataset hub "
                        f"({type(exc).__name__}: {str(exc)[:300]}). {fix}") from exc
