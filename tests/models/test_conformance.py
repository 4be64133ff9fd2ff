"""Conformance suite: every registered model family, from its tiny random config (conf/model/tiny_*.yaml), through
everything gisp does with a model. A new family is one FamilySpec entry and one tiny config; this file then proves it:

- scores: the vectorized head / channel scores equal a per-structure oracle written from the definition (in both
  GQA modes where the family has GQA);
- masks: the masked model computes what the model with the pruned heads' o_proj columns and channels' down_proj
  columns zeroed computes, and removing the masks gives back the dense model exactly;
- export: the compact Hugging Face folder gives the masked model's logits (with output biases, a layer without heads,
  a layer without channels and unequal GQA groups), greedy generation with the KV cache gives the same tokens, and
  every family's folder reloads in a fresh process without gisp (trust_remote_code);
- GGUF: where llama.cpp's deci graph can hold the family, llama.cpp's logits and greedy tokens equal the masked
  model's; elsewhere the export is refused before anything is written, naming the HF export;
- pipeline: every pruner runs through `gisp.run`'s pipeline on the family and lands on its target; the default
  pruner also evaluates.

The random weights include the 1-D parameters (norm weights, biases), so a norm or bias that is dropped or misplaced
shows in the logits.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF, SMOKE, tiny_model
from llama_cpp_check import assert_logits_close, cpp_greedy, cpp_logits, hf_greedy, load_gguf

from gisp.compact import GispDecoderForCausalLM
from gisp.compact.gguf import check_deci_compatible, export_gguf
from gisp.compact.slicing import export_compact
from gisp.errors import GispError
from gisp.models.byte_tokenizer import byte_level_tokenizer
from gisp.models.families import REGISTRY, family_spec, unfuse
from gisp.models.structure import describe, layer_modules
from gisp.prune.importance import structure_scores
from gisp.prune.masks import MaskApplier, Masks, OutputBias
from gisp.prune.objectives import sequence_nll

# model_type -> the stem of its tiny config (tiny_gemma3.yaml -> "gemma3"), discovered: a new tiny config joins
TINY = {yaml.safe_load(p.read_text())["model_type"]: p.stem.removeprefix("tiny_")
        for p in sorted((CONF / "model").glob("tiny_*.yaml"))}
FAMILIES = sorted(TINY.values())
PRUNERS = ["gisp", "oneshot", "llm_pruner", "wanda_sp", "flap", "owl", "shortgpt", "magnitude", "random"]


def test_every_registered_family_has_a_tiny_config():
    assert set(REGISTRY) <= set(TINY), f"add conf/model/tiny_*.yaml for {sorted(set(REGISTRY) - set(TINY))}"


def dense(stem: str, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model (fused projections split, as gisp loads it) with every parameter random: norm
    weights around their identity, biases small."""
    model = unfuse(tiny_model(stem, seed))
    unit_offset = family_spec(model.config.model_type).norm == "rms_unit_offset"  # Gemma: x (1 + w)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                centre = 1.0 if "norm" in name and name.endswith("weight") and not unit_offset else 0.0
                p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))
    return model


def edge_masks(structure, seed: int = 0) -> Masks:
    """Random masks with the edge cases: unequal GQA groups (layer 0), no heads (layer 1), no channels (layer 2)."""
    g = torch.Generator().manual_seed(seed)
    m = Masks(torch.rand(structure.n_layers, structure.n_heads, generator=g) < 0.6,
              torch.rand(structure.n_layers, structure.ffn, generator=g) < 0.5)
    m.heads[0] = torch.tensor([True, False, True, True])
    m.heads[1] = False
    m.channels[2] = False
    m.heads[3], m.channels[3] = True, True
    return m


def ids(n: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def greedy(model, prompt, n: int = 12) -> list[int]:
    """Past Phi-3's 16-token original context (LongRoPE switches) and Gemma's 8-token windows."""
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, prompt.shape[1]:].tolist()


# --------------------------------------------------------------------------------------------------------- scores


def oracle_scores(model, structure):
    """Per unit and channel, |W * grad| summed element by element over the rows / columns that form it."""
    layers = layer_modules(model, family_spec(model.config.model_type))
    d, g = structure.head_dim, structure.group_size
    per_kv = structure.n_heads // structure.n_kv_heads
    heads = torch.full((structure.n_layers, structure.n_units), float("inf"))
    channels = torch.full((structure.n_layers, structure.ffn), float("inf"))
    for i in structure.unprotected:
        m = layers[i]
        t = {name: (lin.weight * lin.weight.grad).abs().double() for name, lin in
             (("q", m.q), ("k", m.k), ("v", m.v), ("o", m.o), ("gate", m.gate), ("up", m.up), ("down", m.down))
             if lin is not None}
        for u in range(structure.n_units):
            s = sum(t["q"][h * d:(h + 1) * d].sum() + t["o"][:, h * d:(h + 1) * d].sum()
                    for h in range(u * g, (u + 1) * g))
            if structure.kv_in_unit:
                kv = u * g // per_kv
                s = s + t["k"][kv * d:(kv + 1) * d].sum() + t["v"][kv * d:(kv + 1) * d].sum()
            heads[i, u] = s
        for j in range(structure.ffn):
            channels[i, j] = sum(t[n][j].sum() for n in ("gate", "up") if n in t) + t["down"][:, j].sum()
    return heads, channels


MODES = [(f, mode) for f in FAMILIES for mode in ("query", "group")]


@pytest.mark.parametrize("stem, gqa_mode", MODES)
def test_scores_equal_the_oracle(stem, gqa_mode):
    model = dense(stem)
    structure = describe(model, gqa_mode=gqa_mode)
    if gqa_mode == "group" and not structure.gqa:
        pytest.skip("no GQA: group mode is query mode")
    model.zero_grad(set_to_none=True)
    sequence_nll(model, ids(3)).mean().backward()
    layers = layer_modules(model, family_spec(model.config.model_type))
    heads, channels = structure_scores(layers, structure, normalization="none")
    ref_h, ref_c = oracle_scores(model, structure)
    torch.testing.assert_close(heads, ref_h.float(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(channels, ref_c.float(), rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("stem", FAMILIES)
def test_masked_is_weight_zeroed_and_restore_is_exact(stem):
    model = dense(stem)
    structure = describe(model)
    x = ids()
    before = logits(model, x)
    masks = edge_masks(structure)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i, m in enumerate(layer_modules(zeroed, family_spec(model.config.model_type))):
            m.o.weight[:, ~masks.heads[i].repeat_interleave(structure.head_dim)] = 0.0
            m.down.weight[:, ~masks.channels[i]] = 0.0
    applier = MaskApplier(layer_modules(model, family_spec(model.config.model_type)), structure)
    applier.set(masks)
    masked = logits(model, x)
    torch.testing.assert_close(masked, logits(zeroed, x), rtol=1e-5, atol=1e-6)
    assert (masked - before).abs().max() > 1e-3  # the masks change the model: the comparison has teeth
    applier.remove()
    assert torch.equal(logits(model, x), before)


# --------------------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every family's masked model (with FLAP-style output biases) exported; ids and masked logits kept for the
    fresh-process check."""
    root = tmp_path_factory.mktemp("conformance")
    out = {}
    for stem in FAMILIES:
        model = dense(stem)
        structure = describe(model)
        masks = edge_masks(structure)
        g = torch.Generator().manual_seed(5)
        bias = OutputBias(0.1 * torch.randn(structure.n_layers, structure.hidden, generator=g),
                          0.1 * torch.randn(structure.n_layers, structure.hidden, generator=g))
        MaskApplier(layer_modules(model, family_spec(model.config.model_type)), structure).set(masks, bias)
        folder = export_compact(model, None, masks, root / stem, bias=bias)
        torch.save({"ids": ids(), "logits": logits(model, ids())}, root / f"{stem}.pt")
        out[stem] = (model, folder)
    return out


@pytest.mark.parametrize("stem", FAMILIES)
def test_compact_export_equals_the_masked_model(stem, exports):
    model, folder = exports[stem]
    compact = GispDecoderForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits(compact, ids()), logits(model, ids()), rtol=1e-4, atol=1e-5)
    assert not hasattr(compact.model.layers[1], "self_attn") and not hasattr(compact.model.layers[2], "mlp")
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    prompt = ids(1, 8, seed=3)
    assert greedy(compact, prompt) == greedy(model, prompt)


@pytest.mark.e2e
def test_every_export_loads_in_a_fresh_process_without_gisp(exports):
    script = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
for folder in sys.argv[1:]:
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    d = torch.load(folder + ".pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(m(d["ids"]).logits, d["logits"], rtol=1e-4, atol=1e-5)
    print("OK", Path(folder).name)
assert not any(name.startswith("gisp") for name in sys.modules), "gisp was imported"
"""
    folders = [str(folder) for _, folder in exports.values()]
    proc = subprocess.run([sys.executable, "-c", script, *folders], cwd=Path(folders[0]).parent, capture_output=True,
                          text=True, timeout=600, check=False, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("OK") == len(FAMILIES)


# ----------------------------------------------------------------------------------------------------------- GGUF


def gguf_config(stem: str):
    """The family's tiny config, with the RoPE llama.cpp can hold where that is the only obstacle (Phi-3's
    LongRoPE and partial rotary are refused, and tested as refused, below)."""
    model = dense(stem)
    if stem == "phi3":
        config = model.config.__class__(**{**model.config.to_dict(),
                                           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
        torch.manual_seed(0)
        import transformers

        model = unfuse(transformers.AutoModelForCausalLM.from_config(config).eval())
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(1.0 if p.dim() == 1 else 0.0, 0.1 if p.dim() == 2 else 0.2)
    return model


@pytest.mark.parametrize("stem", FAMILIES)
def test_gguf_equals_the_masked_model_or_is_refused(stem, tmp_path):
    spec = family_spec(dense(stem).config.model_type)
    model = gguf_config(stem)
    try:
        check_deci_compatible(model.config)
    except GispError as refused:
        assert "format=hf" in str(refused)
        assert spec.gguf_refusal or stem in ("qwen2", "qwen3"), f"{stem} should export to GGUF: {refused}"
        with pytest.raises(GispError, match="format=hf"):
            export_gguf(model, None, Masks.dense(describe(model)), tmp_path / "x.gguf")
        assert not list(tmp_path.iterdir())
        return
    structure = describe(model)
    masks = edge_masks(structure)
    MaskApplier(layer_modules(model, spec), structure).set(masks)
    out = tmp_path / "m.gguf"
    export_gguf(model, byte_level_tokenizer(), masks, out, "f32", structure)
    llm = load_gguf(out)
    x = ids(1, 24, seed=1)[0].tolist()
    assert_logits_close(cpp_logits(llm, x), logits(model, torch.tensor([x]))[0].numpy())
    assert cpp_greedy(llm, x[:8], 12) == hf_greedy(model, x[:8], 12)
    llm.close()


def test_phi3_longrope_and_partial_rotary_are_refused_for_gguf():
    with pytest.raises(GispError, match="partial_rotary_factor.*format=hf"):
        check_deci_compatible(dense("phi3").config)


# ------------------------------------------------------------------------------------------------ reconstruction


@pytest.mark.parametrize("stem", FAMILIES)
def test_reconstruction_compact_equals_installed_and_moves_toward_dense(stem):
    """`lsq` (with an output bias) on the edge masks: the compact model built with the reconstruction's weights and
    bias computes what the masked model with the new columns written in computes; the refit brings the pruned model's
    logits closer to the dense ones on the reconstruction data; the dense weights are untouched."""
    from gisp.compact.slicing import compact_model
    from gisp.reconstruct.build import installed, reconstruct
    from gisp.reconstruct.settings import ReconstructSettings

    model = dense(stem)
    structure = describe(model)
    layers = layer_modules(model, family_spec(model.config.model_type))
    masks = edge_masks(structure)
    batches = [{"input_ids": ids(4, 24, seed=s)} for s in range(4)]
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = reconstruct(model, layers, structure, masks, batches, ReconstructSettings(method="lsq", damp=0.01,
                                                                                     intercept=True))
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())
    assert rec.weights and rec.bias is not None
    x = torch.cat([b["input_ids"] for b in batches])
    target = logits(model, x)
    applier = MaskApplier(layers, structure)
    applier.set(masks)
    plain = logits(model, x)
    applier.set(masks, rec.bias)
    with installed(layers, structure, masks, rec):
        refit = logits(model, x)
    applier.remove()
    compact = compact_model(model, masks, structure, rec.bias, rec.weights)
    torch.testing.assert_close(logits(compact, x), refit, rtol=1e-4, atol=1e-5)
    assert (refit - target).pow(2).mean() < (plain - target).pow(2).mean()


# ------------------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize("stem", [s for s in FAMILIES if s not in ("llama", "mistral")])
def test_every_pruner_runs_on_the_family(stem, pruner, compose_cfg, tmp_path):
    """Through gisp.run's pipeline (Lightning scoring, levels, run dir); the default pruner also evaluates.
    (Llama and Mistral run every pruner in tests/prune/test_methods.py.)"""
    from gisp.config import load_settings
    from gisp.io import read_json
    from gisp.pipeline import run

    evaluate = pruner == "gisp"
    cfg = compose_cfg(f"model=tiny_{stem}", *SMOKE, f"pruner={pruner}", "sparsity=[0.3]",
                      *([] if evaluate else ["eval=none"]))
    run(load_settings(cfg), run_dir=tmp_path / "run")
    results = read_json(tmp_path / "run" / "results.json")
    level = results["targets"]["0.3"]
    structure = describe(dense(stem))
    layer = (structure.n_units * structure.head_params + structure.ffn * structure.channel_params) \
        / structure.decoder_params
    tolerance = layer / 2 if pruner == "shortgpt" else 0.03  # ShortGPT: the closest whole number of layers
    assert abs(level["sparsity"] - 0.3) <= tolerance + 1e-9, level["sparsity"]
    if evaluate:
        assert level["metrics"]["wikitext2_ppl"] > 1.0
