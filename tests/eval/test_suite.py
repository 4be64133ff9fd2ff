"""Perplexity against a slow obvious reference, and the Evaluator on the real WikiText-2 raw test text."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import transformers
from conftest import conf_text_source

from gisp.data.sources import resolve_data_dir
from gisp.errors import GispError
from gisp.eval.perplexity import PerplexityTask, perplexity
from gisp.eval.suite import Evaluator
from gisp.models.byte_tokenizer import byte_level_tokenizer

DATA_DIR = resolve_data_dir(None)

WIKITEXT2_TEST = conf_text_source("eval/wikitext2_128", "tasks", "wikitext2_ppl", "text")


def load_test_tokenizer():
    """The byte-level tokenizer of the tiny test models: real, offline, fast."""
    return byte_level_tokenizer()


def tiny_llama(vocab_size: int = 300) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
    )
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def model() -> transformers.LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 300, (7, 32), generator=gen)  # (n_windows, seq_len)


def reference_ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """One window at a time, HF's own shifted mean CE; ppl = exp(mean of losses) (SparseGPT)."""
    losses = []
    with torch.no_grad():
        for w in windows:
            ids = w[None, :]  # (1, seq_len)
            losses.append(float(model(ids, labels=ids).loss))
    return math.exp(sum(losses) / len(losses))


def test_perplexity_matches_reference(model, windows):
    ref = reference_ppl(model, windows)
    got = perplexity(model, windows, batch_size=4, progress=False)
    assert got == pytest.approx(ref, rel=1e-5)
    assert 1.0 < got < 1e4


def test_batch_size_does_not_change_result(model, windows):
    results = [perplexity(model, windows, batch_size=b, progress=False) for b in (1, 3, 7, 100)]
    for r in results[1:]:
        assert r == pytest.approx(results[0], rel=1e-6)


def test_training_flag_restored(model, windows):
    model.train()
    perplexity(model, windows[:2], batch_size=2, progress=False)
    assert model.training
    model.eval()
    perplexity(model, windows[:2], batch_size=2, progress=False)
    assert not model.training


def test_empty_windows_raise(model):
    with pytest.raises(GispError, match="no evaluation windows"):
        perplexity(model, torch.zeros(0, 128, dtype=torch.int64), batch_size=8, progress=False)


@pytest.mark.skipif(DATA_DIR is None, reason="offline data directory not found")
def test_evaluator_wikitext2_subset():
    tok = load_test_tokenizer()
    model = tiny_llama(vocab_size=max(300, len(tok)))
    task = PerplexityTask(metric="wikitext2_ppl", source=WIKITEXT2_TEST, seq_len=128, max_windows=4, batch_size=2)
    full = dataclasses.replace(task, metric="wikitext2_ppl_w64", seq_len=64, max_windows=None)
    ev = Evaluator([task, full], tok, DATA_DIR)
    info = ev.describe()
    assert info["wikitext2_ppl"]["subset"] is True and info["wikitext2_ppl"]["n_windows"] == 4
    assert info["wikitext2_ppl"]["n_tokens"] == 4 * 128 and info["wikitext2_ppl"]["seq_len"] == 128
    assert info["wikitext2_ppl"]["dataset"]["source"] == "local"
    assert info["wikitext2_ppl_w64"]["subset"] is False
    assert info["wikitext2_ppl_w64"]["n_windows"] == info["wikitext2_ppl_w64"]["stream_tokens"] // 64
    ev.tasks = ev.tasks[:1]  # scoring every 64-token window of the full text is not needed here
    out = ev(model, progress=False)
    assert set(out) == {"wikitext2_ppl", "wikitext2_ppl_stderr"}
    assert math.isfinite(out["wikitext2_ppl"]) and out["wikitext2_ppl"] > 1
    assert out["wikitext2_ppl"] == pytest.approx(reference_ppl(model, ev.windows["wikitext2_ppl"]), rel=1e-5)
    with torch.no_grad():  # the standard error over the windows (delta method), window by window
        means = torch.tensor([float(model(w[None], labels=w[None]).loss) for w in ev.windows["wikitext2_ppl"]])
    want = out["wikitext2_ppl"] * float(means.double().std()) / math.sqrt(len(means))
    assert out["wikitext2_ppl_stderr"] == pytest.approx(want, rel=1e-4)


def test_evaluator_rejects_duplicate_metrics():
    task = PerplexityTask(metric="m", source=WIKITEXT2_TEST)
    with pytest.raises(GispError, match="duplicate"):
        Evaluator([task, task], tokenizer=None, data_dir=DATA_DIR)
