"""A Hugging Face tokenizer as llama.cpp's GGUF tokenizer metadata (`tokenizer.ggml.*` and the chat template).

Two tokenizer families cover the models exported to GGUF (Llama, Mistral, Granite, Phi-3): byte-level BPE (GPT-2
style: Llama-3, SmolLM2, Granite) becomes llama.cpp's `gpt2` model with its merges and a pre-tokenizer name; BPE
with byte fallback (SentencePiece style: Llama-2, Mistral, Phi-3) becomes the `llama` model, whose merge order
llama.cpp reads from token scores: a token made by merge r scores -r, so the highest-scoring bigram is the merge
the HF tokenizer applies first.

llama.cpp identifies a byte-level pre-tokenizer by NAME (each name is a fixed set of split regexes). The name is read
off the tokenizer's own pre-tokenizer description; one it does not know falls back to llama.cpp's `default` with a
warning (pass `pre=` to choose another). The tests compare llama.cpp's tokenization with the HF tokenizer's.
"""

from __future__ import annotations

import json
import logging
import re

import gguf

from gisp.errors import GispError

log = logging.getLogger(__name__)

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Llama-3's split pattern (tokenizer.json Split pre-tokenizer), recognized by two of its distinctive pieces.
LLAMA3_PIECES = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "\\p{N}{1,3}")


def _flat(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [n for child in node.get("pretokenizers", node.get("normalizers", [])) for n in _flat(child)]
    return [node]


def pre_tokenizer_name(backend: dict) -> str | None:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer, or None when it is not one gisp recognizes."""
    steps = [(n.get("type"), n) for n in _flat(backend.get("pre_tokenizer"))]
    kinds = [t for t, _ in steps]
    if kinds == ["ByteLevel"] and steps[0][1].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0][1].get("individual_digits") and steps[1][1].get("use_regex"):
        return "smollm"  # each digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1][1].get("use_regex", True):
        pattern = (steps[0][1].get("pattern") or {}).get("Regex", "")
        if all(piece in pattern for piece in LLAMA3_PIECES):
            return "llama-bpe"
    return None


def _merge_strings(merges: list) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _adds_special(tokenizer, token_id: int | None, first: bool) -> bool:
    """Whether the HF tokenizer puts `token_id` at the start (first) or end of an encoded text by itself."""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    edge = 0 if first else -1
    return bool(ids) and ids[edge] == token_id and (not plain or plain[edge] != token_id)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int, pre: str | None = None) -> dict:
    """Write `tokenizer` (a fast HF tokenizer, or None) as GGUF tokenizer metadata for a model with `n_vocab`
    embedding rows (ids the tokenizer lacks become unused placeholder tokens). Returns what was written."""
    if tokenizer is None:
        writer.add_tokenizer_model("none")  # llama.cpp: token ids only, no text
        return {"model": "none"}
    backend_obj = getattr(tokenizer, "backend_tokenizer", None)
    if backend_obj is None:
        raise GispError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: GGUF export needs its "
                        "tokenizer.json; load the model's tokenizer with use_fast=True")
    backend = json.loads(backend_obj.to_str())
    model = backend["model"]
    if model.get("type") != "BPE":
        raise GispError(f"the tokenizer's model is {model.get('type')}, not BPE: gisp writes the byte-level BPE "
                        "(Llama-3, SmolLM2) and SentencePiece-style BPE (Llama-2, Mistral) tokenizers to GGUF")
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(id_to_token) >= n_vocab:
        raise GispError(f"the tokenizer has ids up to {max(id_to_token)} but the model only {n_vocab} embeddings")
    added = {a["id"]: a for a in backend.get("added_tokens", [])}
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types = [], []
    for i in range(n_vocab):
        text = id_to_token.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif byte_fallback and BYTE_TOKEN.fullmatch(text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = _merge_strings(model.get("merges") or [])
    info: dict = {}
    if byte_fallback:  # SentencePiece style
        writer.add_tokenizer_model("llama")
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}  # first merge making a token
        writer.add_token_scores([-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else -float(len(merges) + i))
                                 for i, t in enumerate(tokens)])
        metaspace = [n for n in _flat(backend.get("pre_tokenizer")) + _flat(backend.get("normalizer"))
                     if n.get("type") == "Prepend" or (n.get("type") == "Metaspace"
                                                       and n.get("prepend_scheme", "always") != "never")]
        writer.add_add_space_prefix(bool(metaspace))
        info["model"] = "llama"
    else:
        name = pre or pre_tokenizer_name(backend)
        if name is None:
            name = "default"
            log.warning("the tokenizer's pre-tokenizer %s is not one gisp maps to a llama.cpp name: writing "
                        "'default' (llama.cpp may split text differently from the HF tokenizer; pass pre=NAME)",
                        json.dumps(backend.get("pre_tokenizer"))[:200])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(name)
        # llama.cpp requires the merges key and gguf-py cannot write an empty array: a BPE without merges (gisp's
        # byte tokenizer) gets one inert entry (no space: it parses as the pair ("", ""), which never occurs).
        writer.add_token_merges(merges or [""])
        info.update(model="gpt2", pre=name)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    writer.add_add_bos_token(_adds_special(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds_special(tokenizer, tokenizer.eos_token_id, first=False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
        info["chat_template"] = True
    return info | {"tokens": len(id_to_token), "merges": len(merges)}
