"""Physical slicing: a masked model becomes a smaller Hugging Face folder that reloads with `from_pretrained`.

The pruned rows and columns are really removed; per-layer head/channel counts and the GQA query-to-KV index go
into the config; a layer with no heads (channels) loses its attention (MLP) block. The folder carries its own
`modeling_gisp.py`, so it loads without gisp through `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from gisp.compact.configuration_gisp import GispDecoderConfig
from gisp.errors import GispError
from gisp.io import atomic_dir
from gisp.models.families import REGISTRY, family_spec, get_submodule
from gisp.models.structure import ModelStructure, describe, layer_modules
from gisp.prune.masks import Masks, sparsity

log = logging.getLogger(__name__)
COMPACT_DIR = Path(__file__).resolve().parent
CODE_FILES = ("configuration_gisp.py", "modeling_gisp.py")


def kv_plan(kept_q: list[int], structure: ModelStructure) -> tuple[list[int], list[int]]:
    """Kept KV heads (original indices) and, per kept query head, the position of its KV head among them.

    A KV head is dropped when no query head of its group survives; groups left unequal are fine (the index)."""
    if not structure.gqa:  # MHA: each head has its own K and V, pruned with it
        return kept_q, list(range(len(kept_q)))
    group = structure.n_heads // structure.n_kv_heads
    kept_kv = sorted({q // group for q in kept_q})
    return kept_kv, [kept_kv.index(q // group) for q in kept_q]


def _rows(weight: torch.Tensor, heads: list[int], d: int) -> torch.Tensor:
    idx = torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long, device=weight.device)
    return weight.index_select(0, idx).contiguous()


def compact_state_dict(model: nn.Module, masks: Masks, structure: ModelStructure) -> tuple[dict, dict]:
    """The compact weights (names as in the compact model) and the per-layer layout for its config."""
    spec = family_spec(model.config.model_type)
    layers = layer_modules(model, spec)
    d = structure.head_dim
    state: dict[str, torch.Tensor] = {}
    layout = {"layer_q_to_kv": [], "layer_kv_heads": [], "layer_intermediate_sizes": []}
    decoder = get_submodule(model, spec.layers)
    for i, m in enumerate(layers):
        if m.o.bias is not None or m.down.bias is not None:
            raise GispError("export of models with o_proj/down_proj biases is not supported")
        kept_q = masks.heads[i].nonzero().flatten().tolist()
        kept_c = masks.channels[i].nonzero().flatten().tolist()
        kept_kv, q_to_kv = kv_plan(kept_q, structure)
        p = f"model.layers.{i}."
        block = decoder[i]
        if kept_q:
            state[p + "input_layernorm.weight"] = get_submodule(block, spec.input_norm).weight.detach()
            for name, lin, heads in (("q_proj", m.q, kept_q), ("k_proj", m.k, kept_kv), ("v_proj", m.v, kept_kv)):
                state[p + f"self_attn.{name}.weight"] = _rows(lin.weight.detach(), heads, d)
                if lin.bias is not None:
                    state[p + f"self_attn.{name}.bias"] = _rows(lin.bias.detach()[:, None], heads, d).flatten()
            state[p + "self_attn.o_proj.weight"] = _rows(m.o.weight.detach().t(), kept_q, d).t().contiguous()
            attn = get_submodule(block, spec.attention)
            for name, norm in (("q_norm", spec.q_norm), ("k_norm", spec.k_norm)):
                if hasattr(attn, norm):
                    state[p + f"self_attn.{name}.weight"] = getattr(attn, norm).weight.detach()
        if kept_c:
            idx = torch.tensor(kept_c, dtype=torch.long, device=m.gate.weight.device)
            post_norm = get_submodule(block, spec.post_attention_norm)
            state[p + "post_attention_layernorm.weight"] = post_norm.weight.detach()
            state[p + "mlp.gate_proj.weight"] = m.gate.weight.detach().index_select(0, idx).contiguous()
            state[p + "mlp.up_proj.weight"] = m.up.weight.detach().index_select(0, idx).contiguous()
            state[p + "mlp.down_proj.weight"] = m.down.weight.detach().index_select(1, idx).contiguous()
        layout["layer_q_to_kv"].append(q_to_kv)
        layout["layer_kv_heads"].append(len(kept_kv))
        layout["layer_intermediate_sizes"].append(len(kept_c))
    state["model.embed_tokens.weight"] = get_submodule(model, spec.embed_tokens).weight.detach()
    state["model.norm.weight"] = get_submodule(model, spec.final_norm).weight.detach()
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.get_output_embeddings().weight.detach()
    return state, layout


def compact_config(model: nn.Module, structure: ModelStructure, layout: dict) -> GispDecoderConfig:
    c = model.config
    spec = family_spec(c.model_type)
    first = layer_modules(model, spec)[0]
    attn = get_submodule(get_submodule(model, spec.layers)[0], spec.attention)
    sliding = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    config = GispDecoderConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, head_dim=structure.head_dim,
        num_hidden_layers=structure.n_layers, num_attention_heads=structure.n_heads,
        num_key_value_heads=structure.n_kv_heads, hidden_act=c.hidden_act, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=dict(c.rope_parameters),
        attention_bias=first.q.bias is not None, mlp_bias=first.gate.bias is not None,
        qk_norm=hasattr(attn, spec.q_norm), sliding_window=sliding, base_model_type=c.model_type,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id, **layout,
    )
    config.auto_map = {"AutoConfig": "configuration_gisp.GispDecoderConfig",
                       "AutoModelForCausalLM": "modeling_gisp.GispDecoderForCausalLM"}
    config.architectures = ["GispDecoderForCausalLM"]
    config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return config


def export_compact(model: nn.Module, tokenizer, masks: Masks, out: str | Path, provenance: dict | None = None,
                   structure: ModelStructure | None = None) -> Path:
    """Write the compact model of `model` under `masks` to the new folder `out` (atomically: all or nothing)."""
    out = Path(out)
    if model.config.model_type not in REGISTRY:
        raise GispError(f"model family '{model.config.model_type}' has no export support; supported: "
                        f"{sorted(REGISTRY)}")
    if out.exists():
        raise GispError(f"{out} already exists: choose a new output folder (export never overwrites)")
    structure = structure or describe(model)
    state, layout = compact_state_dict(model, masks, structure)
    config = compact_config(model, structure, layout)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        for name in CODE_FILES:
            shutil.copy(COMPACT_DIR / name, tmp / name)
        masks.save(tmp / "gisp_masks.safetensors")  # which original heads/channels were kept: the replayable record
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        params = sum(v.numel() for v in state.values())
        record = {"sparsity": sparsity(masks, structure), "parameters": params, **(provenance or {})}
        (tmp / "gisp_export.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("exported %s parameters to %s", f"{params:,}", out)
    return out
