"""Shared fixtures: tiny random decoders built from config (no download), offline environment, one CPU thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"

# No hub here: make every accidental hub call fail fast instead of hanging; wandb writes nothing unless a test asks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


def tiny_config(family: str, layers: int = 4) -> transformers.PretrainedConfig:
    """The style guide's tiny shapes: hidden 64, 4 query heads; Llama without GQA, Mistral with 2 KV heads."""
    common = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
              "vocab_size": 300, "max_position_embeddings": 256}
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=4, **common)
    if family == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, head_dim=16, sliding_window=None, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=2, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, layers))
    with torch.no_grad():  # larger than the default init so heads and channels differ clearly in importance
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=["llama", "mistral"])
def family(request) -> str:
    return request.param


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(*overrides) -> the app's config, as `python -m gisp.run OVERRIDES` would see it."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=["logger=none", "progress=false", "threads=1",
                                                f"cache_dir={tmp_path / 'cache'}", *overrides])

    return _compose
