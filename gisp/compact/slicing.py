"""Physical slicing: a masked model becomes a smaller Hugging Face folder that reloads with `from_pretrained`.

The pruned rows and columns are really removed; per-layer head/channel counts and the GQA query-to-KV index go
into the config; a layer with no heads (channels) loses its attention (MLP) block. The folder carries its own
`modeling_gisp.py`, so it loads without gisp through `trust_remote_code=True`.

Output biases (o_proj / down_proj: the model's own, plus FLAP's compensation of a level) become biases of the
compact o_proj / down_proj; a layer whose heads (channels) are all pruned keeps its bias as a constant it adds.
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
from gisp.compact.modeling_gisp import NORM_NAMES, GispDecoderForCausalLM
from gisp.errors import GispError
from gisp.io import atomic_dir
from gisp.models.families import REGISTRY, FamilySpec, family_spec, get_submodule
from gisp.models.structure import ModelStructure, describe, layer_modules
from gisp.prune.masks import Masks, OutputBias, sparsity

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


def output_biases(layers: list, bias: OutputBias | None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (o_proj bias, down_proj bias) of the masked model: the modules' own biases plus FLAP's
    compensation; None when the model has neither (the compact model then has no output biases)."""
    if bias is None and all(m.o.bias is None and m.down.bias is None for m in layers):
        return None
    out = []
    for i, m in enumerate(layers):
        pair = []
        extras = (None, None) if bias is None else (bias.attn[i], bias.mlp[i])
        for lin, extra in zip((m.o, m.down), extras):
            b = torch.zeros(lin.out_features, dtype=torch.float32)
            if lin.bias is not None:
                b += lin.bias.detach().float().cpu()
            if extra is not None:
                b += extra.float().cpu()
            pair.append(b.to(lin.weight.dtype))
        out.append(tuple(pair))
    return out


def _norm_state(norm: nn.Module, name: str) -> dict[str, torch.Tensor]:
    out = {name + ".weight": norm.weight.detach()}
    if getattr(norm, "bias", None) is not None:  # LayerNorm (Phi-2, OPT)
        out[name + ".bias"] = norm.bias.detach()
    return out


def _norm_of(block: nn.Module, path: str | None) -> nn.Module | None:
    return get_submodule(block, path) if path else None


@torch.no_grad()
def _constant(bias: torch.Tensor, post_norm: nn.Module | None, dtype: torch.dtype) -> torch.Tensor:
    """What a removed block still adds: its output bias, through the block's post-norm when it has one (exactly
    what the masked model computes for a block whose every head / channel is zero)."""
    b = bias.to(dtype)
    return post_norm(b[None, None].to(post_norm.weight.device))[0, 0].cpu() if post_norm is not None else b


def compact_state_dict(model: nn.Module, masks: Masks, structure: ModelStructure,
                       bias: OutputBias | None = None, weights: dict[str, torch.Tensor] | None = None
                       ) -> tuple[dict, dict]:
    """The compact weights (names as in the compact model) and the per-layer layout for its config; `bias` is a
    level's output bias (FLAP's or a reconstruction's: added to the o_proj / down_proj outputs, as
    MaskApplier.set(masks, bias) does); `weights`: a reconstruction's new kept columns of o_proj ("attn.{i}") and
    down_proj ("mlp.{i}"), in place of the dense ones.

    Norms are renamed by role (gisp.compact.modeling_gisp.NORM_NAMES); with a q / k norm over the whole
    projection (OLMo 2) q_proj / k_proj keep every head's rows and the layout records the kept heads."""
    spec = family_spec(model.config.model_type)
    layers = layer_modules(model, spec)
    d = structure.head_dim
    dtype = next(model.parameters()).dtype
    statistic = spec.qk_norm_scope == "projection"
    state: dict[str, torch.Tensor] = {}
    layout = {"layer_q_to_kv": [], "layer_kv_heads": [], "layer_intermediate_sizes": []}
    if statistic:
        layout.update(layer_q_heads=[], layer_kv_keep=[])
    decoder = get_submodule(model, spec.layers)
    biases = output_biases(layers, bias)
    layout["output_bias"] = biases is not None
    roles = {"attn_pre": spec.attn_pre_norm, "attn_post": spec.attn_post_norm, "mlp_pre": spec.mlp_pre_norm,
             "mlp_post": spec.mlp_post_norm}
    for i, m in enumerate(layers):
        kept_q = masks.heads[i].nonzero().flatten().tolist()
        kept_c = masks.channels[i].nonzero().flatten().tolist()
        kept_kv, q_to_kv = kv_plan(kept_q, structure)
        p = f"model.layers.{i}."
        block = decoder[i]
        norms = {role: _norm_of(block, path) for role, path in roles.items()}
        needed = (["attn_pre", "attn_post"] if kept_q else []) + (["mlp_pre", "mlp_post"] if kept_c else [])
        if spec.parallel and kept_c:
            needed.append("attn_pre")  # the norm both parallel blocks read
        for role in dict.fromkeys(needed):
            if norms[role] is not None:
                state.update(_norm_state(norms[role], p + NORM_NAMES[role]))
        if kept_q:
            all_q, all_kv = list(range(structure.n_heads)), list(range(structure.n_kv_heads))
            rows = (("q_proj", m.q, all_q if statistic else kept_q), ("k_proj", m.k, all_kv if statistic else kept_kv),
                    ("v_proj", m.v, kept_kv))
            for name, lin, heads in rows:
                state[p + f"self_attn.{name}.weight"] = _rows(lin.weight.detach(), heads, d)
                if lin.bias is not None:
                    state[p + f"self_attn.{name}.bias"] = _rows(lin.bias.detach()[:, None], heads, d).flatten()
            state[p + "self_attn.o_proj.weight"] = _rows(m.o.weight.detach().t(), kept_q, d).t().contiguous()
            if weights and f"attn.{i}" in weights:
                state[p + "self_attn.o_proj.weight"] = weights[f"attn.{i}"].to(m.o.weight.device, dtype).contiguous()
            if biases is not None:
                state[p + "self_attn.o_proj.bias"] = biases[i][0]
            attn = get_submodule(block, spec.attention)
            for name, norm in (("q_norm", spec.q_norm), ("k_norm", spec.k_norm)):
                if getattr(attn, norm, None) is not None:
                    state.update(_norm_state(getattr(attn, norm), p + f"self_attn.{name}"))
        if kept_c:
            idx = torch.tensor(kept_c, dtype=torch.long, device=m.up.weight.device)
            for name, lin in (("gate_proj", m.gate), ("up_proj", m.up)):
                if lin is None:
                    continue
                state[p + f"mlp.{name}.weight"] = lin.weight.detach().index_select(0, idx).contiguous()
                if lin.bias is not None:
                    state[p + f"mlp.{name}.bias"] = lin.bias.detach().index_select(0, idx).contiguous()
            state[p + "mlp.down_proj.weight"] = m.down.weight.detach().index_select(1, idx).contiguous()
            if weights and f"mlp.{i}" in weights:
                state[p + "mlp.down_proj.weight"] = weights[f"mlp.{i}"].to(m.down.weight.device, dtype).contiguous()
            if biases is not None:
                state[p + "mlp.down_proj.bias"] = biases[i][1]
        if biases is not None and not kept_q:  # the attention block is gone, its bias stays: a constant
            state[p + "attn_out_bias"] = _constant(biases[i][0], norms["attn_post"], dtype)
        if biases is not None and not kept_c:
            state[p + "mlp_out_bias"] = _constant(biases[i][1], norms["mlp_post"], dtype)
        layout["layer_q_to_kv"].append(q_to_kv)
        layout["layer_kv_heads"].append(len(kept_kv))
        layout["layer_intermediate_sizes"].append(len(kept_c))
        if statistic:
            layout["layer_q_heads"].append(kept_q)
            layout["layer_kv_keep"].append(kept_kv)
    state["model.embed_tokens.weight"] = get_submodule(model, spec.embed_tokens).weight.detach()
    if spec.embed_positions:
        state["model.embed_positions.weight"] = get_submodule(model, spec.embed_positions).weight.detach()
    state.update(_norm_state(get_submodule(model, spec.final_norm), "model.norm"))
    head = model.get_output_embeddings()
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = head.weight.detach()
    if head.bias is not None:
        state["lm_head.bias"] = head.bias.detach()
    return state, layout


def _family_numerics(c, spec: FamilySpec) -> dict:
    """The config fields of gisp.compact that carry what the family computes (FamilySpec's data, read off the
    dense model's config)."""
    scale = {"head_dim": None, "query_pre_attn_scalar": getattr(c, "query_pre_attn_scalar", 1.0) ** -0.5,
             "attention_multiplier": getattr(c, "attention_multiplier", None)}[spec.attn_scale]
    embed = {"none": 1.0, "sqrt_hidden": c.hidden_size**0.5,
             "embedding_multiplier": getattr(c, "embedding_multiplier", 1.0)}[spec.embed_scale]
    roles = {"attn_pre": spec.attn_pre_norm, "attn_post": spec.attn_post_norm, "mlp_pre": spec.mlp_pre_norm,
             "mlp_post": spec.mlp_post_norm}
    return {
        "norm": spec.norm, "layer_norms": [role for role, path in roles.items() if path], "parallel": spec.parallel,
        "attn_scale": scale, "embed_scale": embed, "embed_scale_in_dtype": spec.embed_scale == "sqrt_hidden",
        "attn_softcap": getattr(c, spec.attn_softcap_attr, None) if spec.attn_softcap_attr else None,
        "final_softcap": getattr(c, spec.final_softcap_attr, None) if spec.final_softcap_attr else None,
        "residual_scale": getattr(c, spec.residual_scale_attr) if spec.residual_scale_attr else 1.0,
        "logits_divisor": getattr(c, spec.logits_divisor_attr) if spec.logits_divisor_attr else 1.0,
        "positions": "learned" if spec.embed_positions else "rope", "position_offset": spec.position_offset,
        "rope_per_layer_type": spec.rope_per_layer_type, "mlp_gated": spec.gate_proj is not None,
    }


def compact_config(model: nn.Module, structure: ModelStructure, layout: dict) -> GispDecoderConfig:
    c = model.config
    spec = family_spec(c.model_type)
    first = layer_modules(model, spec)[0]
    attn = get_submodule(get_submodule(model, spec.layers)[0], spec.attention)
    sliding = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    has_qk_norm = getattr(attn, spec.q_norm, None) is not None
    rope = getattr(c, "rope_parameters", None)
    config = GispDecoderConfig(
        vocab_size=c.vocab_size, hidden_size=getattr(c, spec.hidden_attr), head_dim=structure.head_dim,
        num_hidden_layers=structure.n_layers, num_attention_heads=structure.n_heads,
        num_key_value_heads=structure.n_kv_heads, hidden_act=getattr(c, spec.act_attr),
        rms_norm_eps=getattr(c, spec.eps_attr, 1e-5),  # 1e-5: OPT's LayerNorm, torch's default
        max_position_embeddings=c.max_position_embeddings,
        rope_parameters=dict(rope) if rope else None, attention_bias=first.q.bias is not None,
        mlp_bias=first.up.bias is not None, qk_norm=spec.qk_norm_scope if has_qk_norm else False,
        attention_window=sliding, attention_types=list(getattr(c, "layer_types", None) or []) or None,
        base_model_type=c.model_type, tie_word_embeddings=c.tie_word_embeddings,
        lm_head_bias=model.get_output_embeddings().bias is not None, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, **_family_numerics(c, spec), **layout,
    )
    config.auto_map = {"AutoConfig": "configuration_gisp.GispDecoderConfig",
                       "AutoModelForCausalLM": "modeling_gisp.GispDecoderForCausalLM"}
    config.architectures = ["GispDecoderForCausalLM"]
    config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return config


def export_compact(model: nn.Module, tokenizer, masks: Masks, out: str | Path, provenance: dict | None = None,
                   structure: ModelStructure | None = None, bias: OutputBias | None = None,
                   weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the compact model of `model` under `masks` (with a level's output `bias` and a reconstruction's
    `weights`) to the new folder `out` (atomically: all or nothing)."""
    out = Path(out)
    if model.config.model_type not in REGISTRY:
        raise GispError(f"model family '{model.config.model_type}' has no export support; supported: "
                        f"{sorted(REGISTRY)}")
    if out.exists():
        raise GispError(f"{out} already exists: choose a new output folder (export never overwrites)")
    structure = structure or describe(model)
    state, layout = compact_state_dict(model, masks, structure, bias, weights)
    config = compact_config(model, structure, layout)
    return write_compact_folder(state, config, tokenizer, masks, out, provenance, structure, bias)


def compact_model(model: nn.Module, masks: Masks, structure: ModelStructure, bias: OutputBias | None = None,
                  weights: dict[str, torch.Tensor] | None = None, own_weights: bool = False) -> GispDecoderForCausalLM:
    """A level's physically smaller model in memory, built from the dense `model`'s weights (what the export writes,
    without the disk round trip). `own_weights`: every tensor is a copy (a model to train fully); otherwise the
    unsliced tensors (embeddings, norms) are shared with `model`."""
    state, layout = compact_state_dict(model, masks, structure, bias, weights)
    config = compact_config(model, structure, layout)
    with torch.device("meta"):
        compact = GispDecoderForCausalLM(config)
    compact.load_state_dict({k: v.clone() if own_weights else v for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        compact.lm_head.weight = compact.model.embed_tokens.weight
    missing = [n for n, p in compact.named_parameters() if p.is_meta]
    if missing:  # a weight the slicing did not provide: a bug, never a silent random init
        raise RuntimeError(f"compact model lacks {missing[:4]}")
    return compact.to(next(model.parameters()).dtype).eval()


def compact_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A compact model's own weights as the folder stores them (a tied output head is not stored twice)."""
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_compact_folder(state: dict[str, torch.Tensor], config: GispDecoderConfig, tokenizer, masks: Masks,
                         out: str | Path, provenance: dict | None, structure: ModelStructure,
                         bias: OutputBias | None = None) -> Path:
    """The folder of a compact model (weights, config, its modeling code, masks, tokenizer, provenance), written
    atomically; `state` and `config` come from slicing a level or from a recovered compact model."""
    out = Path(out)
    if out.exists():
        raise GispError(f"{out} already exists: choose a new output folder (export never overwrites)")
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        config.save_pretrained(tmp)
        for name in CODE_FILES:
            shutil.copy(COMPACT_DIR / name, tmp / name)
        masks.save(tmp / "gisp_masks.safetensors")  # which original heads/channels were kept: the replayable record
        if bias is not None:
            bias.save(tmp / "gisp_output_bias.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        params = sum(v.numel() for v in state.values())
        record = {"sparsity": sparsity(masks, structure), "parameters": params, **(provenance or {})}
        (tmp / "gisp_export.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("exported %s parameters to %s", f"{params:,}", out)
    return out
