"""A byte-level tokenizer that needs no files and no network.

Tiny random test models need a real tokenizer (so the data, calibration and evaluation code paths are the same
as for a pretrained model), but no hub tokenizer can be downloaded offline. A BPE model with the 256
byte-level symbols and no merges encodes any text losslessly, one token per UTF-8 byte.
"""

from __future__ import annotations

import functools
import hashlib

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def _byte_alphabet() -> list[str]:
    """The 256 byte-level symbols in byte order, so that token id == byte value.

    Same mapping as GPT-2's ``bytes_to_unicode``: printable bytes map to themselves, the others to
    code points from 256 upwards.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Build the offline byte-level tokenizer: 256 byte tokens, then ``<s>``, ``</s>``, ``<pad>`` (259 in all).

    No BOS/EOS is added automatically (no post-processor), matching the Llama/SmolLM2 setups used here, so
    callers add special tokens explicitly where they want them. ``clean_up_tokenization_spaces`` is off so
    that ``decode(encode(text)) == text`` for any text.
    """
    alphabet = _byte_alphabet()
    # Sanity: the hand-written table must agree with the library's alphabet, or decoding would be lossy.
    if set(alphabet) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte-level alphabet differs from the tokenizers library's; decoding would be lossy")
    vocab = {symbol: idx for idx, symbol in enumerate(alphabet)}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    return tokenizer


@functools.cache
def byte_level_fingerprint() -> str:
    """sha256 of the byte-level tokenizer's definition: how a tokenizer is recognized as this one."""
    return hashlib.sha256(byte_level_tokenizer().backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def encode_bytes(text: str) -> torch.Tensor | None:
    """What the byte-level tokenizer gives for `text` (one id per UTF-8 byte: no merges, no post-processor), without
    running it: 4 M characters in milliseconds instead of seconds. None when the text holds a special token's string
    (the tokenizer would turn it into that token): the caller tokenizes then."""
    if any(token in text for token in SPECIAL_TOKENS):
        return None
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)
