"""Text sources and token windows, on the real offline data and the real SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import pytest
import torch
from conftest import conf_text_source

from gisp.data.sources import (
    TextSource,
    calibration_windows,
    eval_windows,
    load_text,
    resolve_data_dir,
)
from gisp.errors import GispError
from gisp.models.byte_tokenizer import byte_level_tokenizer

DATA_DIR = resolve_data_dir(None)
needs_data = pytest.mark.skipif(
    DATA_DIR is None or not (DATA_DIR / "wikitext-2-raw" / "test.txt").is_file(),
    reason="offline data directory (../shared/data or GISP_DATA_DIR) not found",
)

WIKITEXT2_TEST = conf_text_source("eval/wikitext2_128", "tasks", "wikitext2_ppl", "text")
AUSTEN = conf_text_source("data/austen", "text")
# sha256 of "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]): the canonical text.
WIKITEXT2_TEST_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def load_test_tokenizer():
    """The byte-level tokenizer of the tiny test models: real, offline, fast."""
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def tok():
    return load_test_tokenizer()


@pytest.fixture(scope="module")
def wikitext() -> str:
    if DATA_DIR is None:
        pytest.skip("no offline data directory")
    return load_text(WIKITEXT2_TEST, DATA_DIR)[0]


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("GISP_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("GISP_DATA_DIR")
    default = resolve_data_dir(None)
    assert default is None or default.name == "data"


@needs_data
def test_wikitext2_raw_local_matches_manifest_sha():
    text, prov = load_text(WIKITEXT2_TEST, DATA_DIR)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == WIKITEXT2_TEST_SHA256
    assert prov["sha256"] == WIKITEXT2_TEST_SHA256
    assert prov["source"] == "local" and prov["files"] == ["wikitext-2-raw/test.txt"]
    assert prov["chars"] == len(text) == 1_294_336
    assert prov["layout"] == "wikitext_rows"


@needs_data
def test_wikitext_rows_is_explicit():
    """Without the flag the raw file is read as is (not the HF join)."""
    text, _ = load_text(dataclasses.replace(WIKITEXT2_TEST, wikitext_rows=False, source="local"), DATA_DIR)
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() != WIKITEXT2_TEST_SHA256


@needs_data
def test_austen_loads():
    text, prov = load_text(AUSTEN, DATA_DIR)
    assert len(text) > 3_000_000 and prov["chars"] == len(text)
    assert prov["source"] == "local" and len(prov["files"]) == 6
    assert "It is a truth universally acknowledged" in text


def test_local_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n\n{"text": "three"}\n', encoding="utf-8")
    src = TextSource(name="local_text", source="local", local_files=("a.txt", "b.jsonl"), join="|")
    text, prov = load_text(src, tmp_path)
    assert text == "alpha\n|one|two|three"
    assert prov["source"] == "local" and prov["files"] == ["a.txt", "b.jsonl"] and prov["chars"] == len(text)
    src2 = dataclasses.replace(src, local_files=(str(tmp_path / "b.jsonl"),), max_documents=2)
    assert load_text(src2, None)[0] == "one|two"
    with pytest.raises(GispError, match="field"):
        load_text(dataclasses.replace(src, text_field="body"), tmp_path)


def test_missing_local_file_names_path(tmp_path):
    src = TextSource(name="x", source="local", local_files=("nope/missing.txt",))
    with pytest.raises(GispError) as err:
        load_text(src, tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "nope" / "missing.txt") in msg and "GISP_DATA_DIR" in msg and "data_dir" in msg


def test_unknown_source():
    with pytest.raises(GispError, match="unknown source"):
        load_text(TextSource(name="x", source="ftp"), None)


def test_auto_without_local_goes_to_hub_and_fails_offline(tmp_path, monkeypatch):
    _offline(tmp_path, monkeypatch)
    with pytest.raises(GispError, match="offline"):
        load_text(WIKITEXT2_TEST, tmp_path / "empty")


def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    # The libraries read these at import; patch the constants too in case they were imported already.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def test_hub_offline_raises_quickly(tmp_path, monkeypatch):
    _offline(tmp_path, monkeypatch)
    src = dataclasses.replace(WIKITEXT2_TEST, source="hub")
    t0 = time.perf_counter()
    with pytest.raises(GispError) as err:
        load_text(src, None)
    assert time.perf_counter() - t0 < 30
    msg = str(err.value)
    assert "offline" in msg and "data=austen" in msg and "wikitext" in msg


@needs_data
def test_calibration_windows_deterministic_and_exact(tok, wikitext):
    stream = tok(wikitext, add_special_tokens=False, return_tensors="pt").input_ids[0]  # (n_tokens,)
    a = calibration_windows(wikitext, tok, n_samples=16, seq_len=64, seed=0)
    b = calibration_windows(wikitext, tok, n_samples=16, seq_len=64, seed=0)
    c = calibration_windows(wikitext, tok, n_samples=16, seq_len=64, seed=1)
    assert a.shape == (16, 64) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < len(tok)
    n = stream.numel()
    for w in a:  # every window is an exact slice of the one token stream
        cands = torch.nonzero(stream[: n - 64] == w[0]).flatten().tolist()
        assert any(torch.equal(stream[s : s + 64], w) for s in cands), "window is not a slice of the token stream"


def test_calibration_too_short_raises(tok):
    with pytest.raises(GispError, match="seq_len"):
        calibration_windows("a short text", tok, n_samples=4, seq_len=128, seed=0)
    with pytest.raises(GispError, match="n_samples"):
        calibration_windows("a short text " * 100, tok, n_samples=0, seq_len=8, seed=0)


def test_calibration_bounds_small_text(tok):
    text = " ".join(str(i) for i in range(200))
    stream = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]  # (n_tokens,)
    seq_len = stream.numel() - 3  # only 3 valid starts: 0, 1, 2
    w = calibration_windows(text, tok, n_samples=50, seq_len=seq_len, seed=0)
    starts = set()
    for row in w:
        found = [s for s in range(3) if torch.equal(stream[s : s + seq_len], row)]
        assert found
        starts.update(found)
    assert starts == {0, 1, 2}


@needs_data
def test_eval_windows_non_overlapping_prefix(tok, wikitext):
    stream = tok(wikitext, return_tensors="pt").input_ids[0]  # (n_tokens,) with default special tokens
    w = eval_windows(wikitext, tok, seq_len=128)
    assert w.shape == (stream.numel() // 128, 128)
    assert torch.equal(w.reshape(-1), stream[: w.numel()])
    w4 = eval_windows(wikitext, tok, seq_len=128, max_windows=4)
    assert torch.equal(w4, w[:4])
    assert eval_windows("hi", tok, seq_len=128).shape == (0, 128)
