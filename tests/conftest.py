"""Shared fixtures: tiny random decoders built from config (no download), offline environment, one CPU thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
import yaml

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
# Converted real models (SmolLM2 from its GGUF package) are cached where users keep them, so the tests that load the
# real model convert it once per machine, not once per test; tests of the conversion itself use a fresh folder.
MODEL_CACHE = Path(os.environ.get("GISP_CACHE_DIR", "~/.cache/gisp")).expanduser()
# The smallest complete run (conf/experiment/smoke.yaml): tiny Mistral, 8 x 32-token calibration windows, 8 short
# evaluation windows. Tests add what they vary (model=..., sparsity=..., eval=none, ...).
SMOKE = ["experiment=smoke"]

# No hub here: make every accidental hub call fail fast instead of hanging; wandb writes nothing unless a test asks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)


def tiny_config(family: str, layers: int = 4) -> transformers.PretrainedConfig:
    """The tiny shapes of conf/model/tiny_{family}.yaml (the one definition of the tiny models): hidden 64, 4 query
    heads; the GQA families with 2 KV heads; every family of conf/model/tiny_*.yaml. A 300-token vocabulary."""
    node = yaml.safe_load((CONF / "model" / f"tiny_{family}.yaml").read_text())
    # special ids inside the small vocabulary (some families default to ids of their real tokenizers)
    fields = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **node["config"], "num_hidden_layers": layers,
              "vocab_size": 300}
    return transformers.AutoConfig.for_model(node["model_type"], **fields)


def tiny_model(family: str, seed: int = 0, layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, layers))
    with torch.no_grad():  # larger than the default init so heads and channels differ clearly in importance
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread; a run that set `threads` (or a heavy test that takes both cores) gives it
    back, so the tests after it run as they do alone."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(params=["llama", "mistral"])
def family(request) -> str:
    return request.param


def compose(name: str, *overrides: str) -> dict:
    """The plain config `python -m gisp.<command> OVERRIDES` would see (`name`: the command's primary config)."""
    from gisp.cli import compose_config

    return compose_config(name, list(overrides))


def compose_hydra(name: str, *overrides: str):
    """The DictConfig of `python -m gisp.<command> OVERRIDES` with Hydra's own node (launchers, sweeper params)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import gisp.cli  # noqa: F401  (registers gisp's resolvers)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides), return_hydra_config=True)


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(*overrides) -> gisp.run's config (plain values), as `python -m gisp.run OVERRIDES` would see it."""

    def _compose(*overrides: str) -> dict:
        return compose("config", "logger=none", "progress=false", "threads=1", f"cache_dir={MODEL_CACHE}",
                       f"store_dir={tmp_path / 'store'}", *overrides)

    return _compose


def conf_text_source(config: str, *path: str):
    """The TextSource of a conf YAML, e.g. conf_text_source("eval/wikitext2_128", "tasks", "wikitext2_ppl", "text"):
    tests use the same sources as the runs (no copies of the YAML in the library)."""
    from gisp.data.recipes import text_source

    node = yaml.safe_load((CONF / f"{config}.yaml").read_text())
    for key in path:
        node = node[key]
    return text_source(node)


def saved_tensor_bytes(model: torch.nn.Module, forward) -> int:
    """Bytes of the tensors autograd keeps for backward while `forward()` runs (saved-tensor hooks): each storage
    counted once, the model's weights not at all. The activation memory that gisp.plan estimates."""
    params = {p.data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(kept.values())
