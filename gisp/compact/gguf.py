"""llama.cpp export: a pruned Llama / Mistral / Granite / Phi-3 (default RoPE) decoder as a GGUF of llama.cpp's `deci`.

`deci` (the Llama-3.x-Nemotron NAS models) is the llama.cpp graph that reads per-layer arrays for the query heads,
KV heads and FFN width of every layer, 0 meaning "no attention" / "no MLP" there. The writer starts from the COMPACT
model (the state dict and layout of gisp.compact.slicing, or an exported folder) and maps it onto what deci's loader
and graph require. Each trap below was read in llama.cpp's source and is tested against a real llama.cpp:

1. Grouped attention: query head i of a layer reads KV head i // (n_head / n_head_kv), so groups must be equal and
   contiguous. Query-head pruning leaves unequal groups; both exact fixes add 2 d_h d parameters per added head:
   PAD each group to the largest with zero-output query heads (zero q rows and o columns: + Q/O work, same KV
   cache), or DUPLICATE KV heads so every group has gcd-many query heads (+ K/V rows AND KV cache). Padding is
   taken unless duplicating adds fewer heads and keeps the layer within the dense model's KV heads: a KV cache
   above the dense model's would cost decode memory, and without flash attention llama.cpp pads EVERY layer's V
   cache to the widest layer.
2. A layer with query heads but 0 KV heads is deci's "linear attention" block: never written (a kept query head
   always keeps its KV head).
3. `n_ff == 0` skips the rest of the layer INCLUDING its attention output: a layer that keeps attention (and the
   last layer, whose output rows llama.cpp selects inside it) keeps one zero-output MLP channel (3 d parameters).
4. Layer 0's head count sets the head size before `key_length` is read (0 heads there: no head size at all):
   layer 0 keeps one zero-output head if it has none.
5. deci has no place for q/k/v biases or QK-norm (Qwen2, Qwen3): refused; the HF export (format=hf) serves them.
6. RoPE: deci rotates consecutive pairs (llama.cpp's NORM rope), HF rotates halves: q and k rows are permuted per
   head (the attention scores are unchanged); `key_length`, `value_length` and `rope.dimension_count` are explicit.

Output biases (a FLAP level's compensation, or the model's own) go to `attn_output.bias` / `ffn_down.bias`; a layer
with a bias but no heads (channels) keeps one zero-output head (channel) to carry it.

Speed: llama.cpp's fast CPU matrix kernels (llamafile sgemm; q8_0 blocks of 32) need the reduction length to be a
multiple of the SIMD width, and ffn_down's reduction length is the layer's MLP width. A ragged width (e.g. 1,100 of
1,536 channels) falls back to a generic kernel several times slower in prefill, so each MLP is padded with zero
channels to a multiple of `ffn_multiple` (32 by default: also whole q8_0 blocks); exact, at most 31 x 3 d
parameters per layer.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from gisp.compact.gguf_vocab import add_tokenizer
from gisp.errors import GispError
from gisp.io import atomic_file
from gisp.models.families import REGISTRY

log = logging.getLogger(__name__)

ARCH = "deci"
DTYPES = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
          "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
          "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
HF_ALTERNATIVE = "export it as a Hugging Face folder instead (format=hf; it loads with transformers)"


@dataclass(frozen=True)
class DeciLayer:
    """One layer as written: compact positions of the query heads, KV heads and channels in GGUF order, None for a
    zero-output head (channel) added for llama.cpp's sake; `fix` says which trap was handled."""

    q: list[int | None]
    kv: list[int | None]
    channels: list[int | None]
    fix: str = ""


def plan_layer(q_to_kv: list[int], n_kv: int, n_ff: int, need_head: bool = False, need_channel: bool = False,
               max_kv: int | None = None, ffn_multiple: int = 1) -> DeciLayer:
    """What one compact layer becomes in deci (pure: the traps 1-4 and the MLP padding of the module docstring).

    `q_to_kv[i]`: the KV head (position among the n_kv kept) of kept query head i; `need_head` / `need_channel`: the
    layer needs an attention / MLP block even without heads / channels (layer 0, a bias to carry, the last layer);
    `max_kv`: the dense model's KV heads (duplication may not exceed them); `ffn_multiple`: MLP width alignment."""
    fixes = []
    if not q_to_kv:
        q, kv = ([None], [None]) if need_head else ([], [])
        if need_head:
            fixes.append("zero head")
    else:
        groups = [[i for i, j in enumerate(q_to_kv) if j == k] for k in range(n_kv)]
        if any(not g for g in groups) or q_to_kv != sorted(q_to_kv):
            raise GispError(f"a layer's query-to-KV map {q_to_kv} has a KV head without query heads or is not "
                            "grouped contiguously: not a gisp compact layout")
        sizes = [len(g) for g in groups]
        pad_heads = max(sizes) * n_kv - len(q_to_kv)
        unit = math.gcd(*sizes)
        dup_heads = len(q_to_kv) // unit - n_kv
        if pad_heads == 0:
            q, kv = [i for g in groups for i in g], list(range(n_kv))
        elif pad_heads <= dup_heads or (max_kv is not None and n_kv + dup_heads > max_kv):
            q = [i for g in groups for i in g + [None] * (max(sizes) - len(g))]
            kv = list(range(n_kv))
            fixes.append(f"pad {pad_heads} zero query heads")
        else:
            q = [i for g in groups for i in g]
            kv = [k for k, g in enumerate(groups) for _ in range(len(g) // unit)]
            fixes.append(f"duplicate {dup_heads} KV heads")
    channels: list[int | None] = list(range(n_ff))
    if not channels and (q or need_channel):
        channels = [None]
        fixes.append("zero channel")
    elif channels:
        channels += [None] * (-n_ff % ffn_multiple)
    return DeciLayer(q, kv, channels, ", ".join(fixes))


def check_deci_compatible(config) -> None:
    """Refuse what deci cannot hold, naming the alternative, before anything is sliced or written. `config`: the
    dense model's HF config or a compact GispDecoderConfig."""
    family = getattr(config, "base_model_type", None) or config.model_type
    if family not in REGISTRY:
        raise GispError(f"GGUF export supports the families of gisp.models.families, not {family}; {HF_ALTERNATIVE}")
    refusal = REGISTRY[family].gguf_refusal
    if refusal:
        raise GispError(f"{family} computes what llama.cpp's deci graph cannot hold exactly ({refusal}); "
                        f"{HF_ALTERNATIVE}")
    if getattr(config, "qk_norm", False) or family == "qwen3":
        raise GispError(f"{family} normalizes queries and keys per head (QK-norm, e.g. Qwen3): llama.cpp's deci "
                        f"architecture has no QK-norm, so a GGUF cannot hold it; {HF_ALTERNATIVE}")
    if getattr(config, "attention_bias", False) or family == "qwen2":
        raise GispError(f"{family} has q/k/v biases (e.g. Qwen2): llama.cpp's deci architecture (the one with "
                        f"per-layer heads) has no place for them in gisp's GGUF export; {HF_ALTERNATIVE}")
    if getattr(config, "mlp_bias", False):
        raise GispError(f"gate/up projection biases are not written to GGUF by gisp; {HF_ALTERNATIVE}")
    if config.hidden_act != "silu":
        raise GispError(f"deci's MLP is SiLU-gated, the model uses {config.hidden_act}; {HF_ALTERNATIVE}")
    rope = config.rope_parameters or {}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise GispError(f"{family} rotates only part of each head (partial_rotary_factor "
                        f"{rope['partial_rotary_factor']}), which gisp's GGUF export does not write; {HF_ALTERNATIVE}")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise GispError(f"RoPE scaling {rope_type!r} is not written to GGUF by gisp (default, linear and llama3 are); "
                        f"{HF_ALTERNATIVE}")


def _permute_rope(w: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp NORM pairs, per head: row 2i = HF row i, row 2i+1 = HF row i + d/2."""
    return w.reshape(n, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def _pick(w: torch.Tensor, idx: list[int | None], size: int) -> torch.Tensor:
    """Blocks of `size` rows of `w` in the order of idx; None = a zero block. (len(idx) * size, cols)"""
    blocks = [w[i * size:(i + 1) * size] if i is not None else w.new_zeros(size, w.shape[1])
              for i in idx]
    return torch.cat(blocks) if blocks else w[:0]


def _rope_factors(config) -> torch.Tensor | None:
    """Llama-3 rope scaling as llama.cpp's per-frequency divisors (`rope_freqs`): plain / scaled inverse freqs."""
    params = config.rope_parameters or {}
    if params.get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    d = config.head_dim
    plain = 1.0 / (params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    return (plain / scaled.double()).float()


def deci_tensors(state: dict[str, torch.Tensor], config, plans: list[DeciLayer]) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> tensor (HF layout: (out, in), the model's dtype) for every layer plan."""
    d_h, h = config.head_dim, config.hidden_size
    embed = state["model.embed_tokens.weight"]
    # Granite's multipliers, folded into the weights (deci has none): the embedding multiplier into token_embd, the
    # logit divisor into the output matrix (then written even when tied), the attention multiplier into q (deci
    # scales by 1/sqrt(d_h)), the residual multiplier into each block's output projection and bias
    embed_scale, divisor = getattr(config, "embed_scale", 1.0), getattr(config, "logits_divisor", 1.0)
    head = embed if config.tie_word_embeddings else state["lm_head.weight"]
    out = {"token_embd.weight": _scaled(embed, embed_scale), "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings or embed_scale != 1.0 or divisor != 1.0:
        out["output.weight"] = _scaled(head, 1.0 / divisor)
    attn_scale = getattr(config, "attn_scale", None)
    q_scale = 1.0 if attn_scale is None else attn_scale * math.sqrt(d_h)
    residual = getattr(config, "residual_scale", 1.0)
    factors = _rope_factors(config)
    if factors is not None:
        out["rope_freqs.weight"] = factors
    for i, plan in enumerate(plans):
        out.update(_layer_tensors(state, f"model.layers.{i}.", f"blk.{i}.", plan, d_h, h, q_scale, residual))
    return {k: v.detach() for k, v in out.items()}


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t x factor computed in float32 (the file stores at most float32): no bf16 rounding of the product."""
    return t if factor == 1.0 else t.float() * factor


def _layer_tensors(state: dict, p: str, g: str, plan: DeciLayer, d_h: int, h: int, q_scale: float = 1.0,
                   residual: float = 1.0) -> dict[str, torch.Tensor]:
    """The GGUF tensors of one layer (compact names under prefix p, GGUF names under g); blocks the compact layer
    lacks (a zero head or channel added by the plan) read as zeros."""

    def get(name: str, transpose: bool = False) -> torch.Tensor:  # (rows, h): o_proj / down_proj transposed
        if p + name not in state:
            return torch.zeros(0, h)
        w = state[p + name]
        return w.t().contiguous() if transpose else w

    out = {}
    if plan.q:
        out[g + "attn_norm.weight"] = state.get(p + "input_layernorm.weight", torch.ones(h))
        q = _scaled(_pick(get("self_attn.q_proj.weight"), plan.q, d_h), q_scale)
        out[g + "attn_q.weight"] = _permute_rope(q, len(plan.q), d_h)
        out[g + "attn_k.weight"] = _permute_rope(_pick(get("self_attn.k_proj.weight"), plan.kv, d_h), len(plan.kv), d_h)
        out[g + "attn_v.weight"] = _pick(get("self_attn.v_proj.weight"), plan.kv, d_h)
        out[g + "attn_output.weight"] = _scaled(_pick(get("self_attn.o_proj.weight", True), plan.q, d_h).t(), residual)
        bias = state.get(p + "self_attn.o_proj.bias", state.get(p + "attn_out_bias"))
        if bias is not None:
            out[g + "attn_output.bias"] = _scaled(bias, residual)
    if plan.channels:
        out[g + "ffn_norm.weight"] = state.get(p + "post_attention_layernorm.weight", torch.ones(h))
        out[g + "ffn_gate.weight"] = _pick(get("mlp.gate_proj.weight"), plan.channels, 1)
        out[g + "ffn_up.weight"] = _pick(get("mlp.up_proj.weight"), plan.channels, 1)
        out[g + "ffn_down.weight"] = _scaled(_pick(get("mlp.down_proj.weight", True), plan.channels, 1).t(), residual)
        bias = state.get(p + "mlp.down_proj.bias", state.get(p + "mlp_out_bias"))
        if bias is not None:
            out[g + "ffn_down.bias"] = _scaled(bias, residual)
    return out


def layer_plans(state: dict[str, torch.Tensor], config, ffn_multiple: int = 32) -> list[DeciLayer]:
    n = config.num_hidden_layers
    plans = []
    for i in range(n):
        p = f"model.layers.{i}."
        attn_bias = p + "attn_out_bias" in state and bool(state[p + "attn_out_bias"].abs().max() > 0)
        mlp_bias = p + "mlp_out_bias" in state and bool(state[p + "mlp_out_bias"].abs().max() > 0)
        plans.append(plan_layer(config.layer_q_to_kv[i], config.layer_kv_heads[i], config.layer_intermediate_sizes[i],
                                need_head=attn_bias or i == 0, need_channel=mlp_bias or i == n - 1,
                                max_kv=config.num_key_value_heads, ffn_multiple=ffn_multiple))
    return plans


def _encode(name: str, t: torch.Tensor, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """One tensor in the file's precision: 1-D tensors (norms, biases, rope factors) stay f32; q8_0 needs rows
    that are whole 32-value blocks, other rows fall back to f16 (as llama.cpp's converter does)."""
    a = t.float().cpu().contiguous().numpy()  # one tensor at a time: no float32 copy of a whole bf16 model
    if a.ndim == 1 or dtype == "f32":
        return a.astype(np.float32), gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_deci_gguf(state: dict[str, torch.Tensor], config, tokenizer, out: str | Path, dtype: str = "f16",
                    name: str = "gisp", metadata: dict | None = None, pre: str | None = None,
                    ffn_multiple: int = 32) -> dict:
    """Write the compact model (`state`, GispDecoderConfig `config`) as a deci GGUF at the new path `out`
    (atomically). Returns a summary: per-layer counts, fixes, parameters, bytes."""
    out = Path(out)
    if dtype not in DTYPES:
        raise GispError(f"GGUF dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if out.exists():
        raise GispError(f"{out} already exists: choose a new output file (export never overwrites)")
    check_deci_compatible(config)
    plans = layer_plans(state, config, ffn_multiple)
    tensors = deci_tensors(state, config, plans)
    n_vocab = tensors["token_embd.weight"].shape[0]
    context = config.max_position_embeddings
    window = getattr(config, "attention_window", None)
    if window and window < context:
        log.warning("deci has no sliding-window attention: the GGUF declares a context of %d (the model's window) "
                    "instead of %d, within which attention is exact", window, context)
        context = window
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_name(name)
        w.add_file_type(int(DTYPES[dtype][1]))
        w.add_block_count(config.num_hidden_layers)
        w.add_context_length(context)
        w.add_embedding_length(config.hidden_size)
        w.add_vocab_size(n_vocab)
        w.add_head_count([len(p.q) for p in plans])
        w.add_head_count_kv([len(p.kv) for p in plans])
        w.add_feed_forward_length([len(p.channels) for p in plans])
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
        w.add_rope_dimension_count(config.head_dim)
        rope = config.rope_parameters or {}
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        vocab = add_tokenizer(w, tokenizer, n_vocab, pre)
        for key, value in (metadata or {}).items():
            w.add_string(f"gisp.{key}", value if isinstance(value, str) else json.dumps(value))
        for tname in list(tensors):
            data, qtype = _encode(tname, tensors[tname], dtype)
            w.add_tensor(tname, data, raw_dtype=qtype if qtype == gguf.GGMLQuantizationType.Q8_0 else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    summary = {"path": str(out), "dtype": dtype, "bytes": out.stat().st_size, "vocab": vocab,
               "parameters": sum(t.numel() for t in tensors.values()),
               "head_count": [len(p.q) for p in plans], "head_count_kv": [len(p.kv) for p in plans],
               "feed_forward_length": [len(p.channels) for p in plans],
               "aligned_channels": sum(len(p.channels) - n for p, n in zip(plans, config.layer_intermediate_sizes)
                                       if n),
               "fixes": {i: p.fix for i, p in enumerate(plans) if p.fix}}
    for i, fix in summary["fixes"].items():
        log.info("layer %d: %s", i, fix)
    return summary


def export_gguf(model: torch.nn.Module, tokenizer, masks, out: str | Path, dtype: str = "f16",
                structure=None, bias=None, provenance: dict | None = None, pre: str | None = None,
                ffn_multiple: int = 32, weights: dict | None = None) -> dict:
    """The masked `model` (a level: masks, its output bias and a reconstruction's `weights`) as a deci GGUF at `out`:
    sliced as for the HF export (gisp.compact.slicing), then written. Refuses unsupported families before any
    slicing."""
    from gisp.compact.slicing import compact_config, compact_state_dict
    from gisp.models.structure import describe
    from gisp.prune.masks import sparsity

    if Path(out).exists():
        raise GispError(f"{out} already exists: choose a new output file (export never overwrites)")
    check_deci_compatible(model.config)
    structure = structure or describe(model)
    state, layout = compact_state_dict(model, masks, structure, bias, weights)
    config = compact_config(model, structure, layout)
    metadata = {"sparsity": f"{sparsity(masks, structure):.6f}", "gqa_mode": structure.gqa_mode,
                **({"provenance": provenance} if provenance else {})}
    return write_deci_gguf(state, config, tokenizer, out, dtype, name=str((provenance or {}).get("model", "gisp")),
                           metadata=metadata, pre=pre, ffn_multiple=ffn_multiple)


def export_gguf_from_folder(folder: str | Path, out: str | Path, dtype: str = "f16", pre: str | None = None,
                            ffn_multiple: int = 32) -> dict:
    """A compact HF folder written by gisp (GispDecoderForCausalLM) as a deci GGUF."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from gisp.compact.configuration_gisp import GispDecoderConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise GispError(f"{folder} is not an exported gisp folder (config.json and model.safetensors expected)")
    config = GispDecoderConfig.from_pretrained(folder)
    if json.loads((folder / "config.json").read_text()).get("model_type") != GispDecoderConfig.model_type:
        raise GispError(f"{folder} is not a gisp compact export (model_type {GispDecoderConfig.model_type})")
    check_deci_compatible(config)
    tokenizer = AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer.json").is_file() else None
    record = folder / "gisp_export.json"
    metadata = {"provenance": json.loads(record.read_text())} if record.is_file() else {}
    return write_deci_gguf(load_file(str(folder / "model.safetensors")), config, tokenizer, out, dtype,
                           name=folder.name, metadata=metadata, pre=pre, ffn_multiple=ffn_multiple)
