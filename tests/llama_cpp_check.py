"""llama.cpp as the oracle of the GGUF tests (tests/compact/test_gguf.py, tests/models/test_conformance.py): a GGUF
loaded through llama-cpp-python, its logits and its greedy tokens on llama.cpp's own KV cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch


def llama_cpp():
    """llama-cpp-python (the `llama` extra). CI sets GISP_REQUIRE_LLAMA_CPP=1, so there a missing build fails."""
    try:
        import llama_cpp as module
    except ImportError:
        if os.environ.get("GISP_REQUIRE_LLAMA_CPP"):
            raise
        pytest.skip("llama-cpp-python is not installed: pip install -e '.[llama]' (builds llama.cpp, ~10 min)")
    return module


def load_gguf(path, f32_cache: bool = True, n_ctx: int = 256):
    kwargs = {"type_k": 0, "type_v": 0} if f32_cache else {}  # GGML_TYPE_F32
    return llama_cpp().Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=1, seed=0,
                             verbose=False, **kwargs)


def cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])  # (T, V)


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Greedy decoding on llama.cpp's KV cache, one token at a time."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    prompt = torch.tensor([ids])
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(ids):].tolist()


def assert_logits_close(got: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    np.testing.assert_allclose(got, ref, rtol=0, atol=rel * float(np.abs(ref).max()))
