"""Model families as data: where the prunable structures live in each decoder architecture, and what the compact
model must do to compute exactly what the family computes.

Every family-specific fact the pruning, export and recovery code needs is in one `FamilySpec`; there are no
per-model code paths. A family is one registry entry (plus a conf/model YAML and a tiny config for the conformance
suite, tests/models/test_conformance.py). Names are attribute paths relative to the CausalLM (layers, embeddings,
final norm), to a decoder layer (attention, MLP, norms) or to the attention / MLP module (projections, q/k norms).

Canonical pieces: a layer has an attention block (q, k, v, o projections, optional q/k norms) and an MLP block
(gate, up, down; a plain MLP has up and down only), and up to four norms by role: before / after the attention
block, before / after the MLP (Gemma has all four, OLMo 2 only the two after, Phi-2 one shared by both blocks that
run in parallel). Fused projections (Phi-3's qkv_proj and gate_up_proj) are split into separate ones when the model
is loaded (`unfuse`, exact), so every family is pruned through the same projections (seven, or six for a plain MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gisp.errors import GispError


@dataclass(frozen=True)
class FamilySpec:
    """Names of the decoder pieces of one model family, and its computation as data for the compact model."""

    layers: str = "model.layers"  # ModuleList of decoder layers
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"  # "" when the MLP projections sit on the layer itself (OPT)
    gate_proj: str | None = "gate_proj"  # None: a plain MLP, down(act(up(x))) (Phi-2's fc1 / fc2, OPT)
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    fused_qkv: str | None = None  # one module of rows [Q | K | V] (Phi-3), split into q/k/v_proj at load
    fused_gate_up: str | None = None  # one module of rows [gate | up] (Phi-3), split into gate/up_proj at load
    # Norms by role, relative to a decoder layer (None: the family has no such norm)
    attn_pre_norm: str | None = "input_layernorm"
    attn_post_norm: str | None = None  # on the attention block's output (Gemma, OLMo 2)
    mlp_pre_norm: str | None = "post_attention_layernorm"
    mlp_post_norm: str | None = None  # on the MLP's output (Gemma, OLMo 2)
    parallel: bool = False  # attention and MLP both read the attention's input norm and add up (Phi-2)
    q_norm: str = "q_norm"  # query / key norms (Qwen3, Gemma 3 per head; Phi-2 q_layernorm; OLMo 2 see scope)
    k_norm: str = "k_norm"
    qk_norm_scope: str = "head"  # "projection": over the whole q / k projection (OLMo 2), see describe()
    embed_tokens: str = "model.embed_tokens"
    embed_positions: str | None = None  # learned absolute positions (OPT), else rotary
    position_offset: int = 0  # OPT looks position p up at row p + 2
    final_norm: str = "model.norm"
    # Config attribute names
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str = "num_key_value_heads"
    head_dim_attr: str = "head_dim"
    hidden_attr: str = "hidden_size"
    ffn_attr: str = "intermediate_size"
    n_layers_attr: str = "num_hidden_layers"
    act_attr: str = "hidden_act"
    eps_attr: str = "rms_norm_eps"
    # The computation, as data (gisp.compact reads these)
    norm: str = "rms"  # rms | rms_weight_fp32 (OLMo 2) | rms_unit_offset (Gemma: x * (1 + w)) | layer (LayerNorm)
    attn_scale: str = "head_dim"  # head_dim (1/sqrt(d)) | query_pre_attn_scalar (Gemma) | attention_multiplier
    attn_softcap_attr: str | None = None  # Gemma 2: tanh soft-capping of the attention logits
    final_softcap_attr: str | None = None  # Gemma 2 / 3: of the output logits
    embed_scale: str = "none"  # none | sqrt_hidden (Gemma) | embedding_multiplier (Granite)
    residual_scale_attr: str | None = None  # Granite: each block's output x residual_multiplier
    logits_divisor_attr: str | None = None  # Granite: logits / logits_scaling
    rope_per_layer_type: bool = False  # Gemma 3: rope_parameters keyed by layer type (two bases)
    # Config settings the computation above assumes: (attribute, value); a value "@name" means "equal to the
    # attribute name". A config that sets one otherwise is refused (an absent attribute takes the family default).
    requires: tuple[tuple[str, object], ...] = ()
    # Why llama.cpp's deci graph cannot compute the family exactly ("" = it can: a Llama block, multipliers folded
    # into the weights; gisp.compact.gguf still checks each config, e.g. for biases, QK-norm or the RoPE type)
    gguf_refusal: str = ""


GEMMA_REFUSAL = "(1 + w) norms around each block, GeGLU, soft-capping, per-layer sliding windows"
LLAMA_LAYOUT = FamilySpec()
PHI = FamilySpec(o_proj="dense", gate_proj=None, up_proj="fc1", down_proj="fc2", mlp_pre_norm=None, parallel=True,
                 q_norm="q_layernorm", k_norm="k_layernorm", final_norm="model.final_layernorm", norm="layer",
                 eps_attr="layer_norm_eps",
                 gguf_refusal="parallel attention and MLP blocks, LayerNorm with bias, partial rotary, a GELU MLP")
OPT = FamilySpec(layers="model.decoder.layers", o_proj="out_proj", mlp="", gate_proj=None, up_proj="fc1",
                 down_proj="fc2", attn_pre_norm="self_attn_layer_norm", mlp_pre_norm="final_layer_norm",
                 embed_tokens="model.decoder.embed_tokens", embed_positions="model.decoder.embed_positions",
                 position_offset=2, final_norm="model.decoder.final_layer_norm", n_kv_heads_attr="num_attention_heads",
                 ffn_attr="ffn_dim", act_attr="activation_function", eps_attr="layer_norm_eps", norm="layer",
                 # OPT-350m: norms after the blocks, no final norm, embeddings projected from a narrower width
                 requires=(("do_layer_norm_before", True), ("_remove_final_layer_norm", False),
                           ("word_embed_proj_dim", "@hidden_size")),
                 gguf_refusal="learned absolute positions, LayerNorm with bias, a ReLU MLP")
GEMMA2 = FamilySpec(attn_post_norm="post_attention_layernorm", mlp_pre_norm="pre_feedforward_layernorm",
                    mlp_post_norm="post_feedforward_layernorm", act_attr="hidden_activation", norm="rms_unit_offset",
                    attn_scale="query_pre_attn_scalar", attn_softcap_attr="attn_logit_softcapping",
                    final_softcap_attr="final_logit_softcapping", embed_scale="sqrt_hidden",
                    gguf_refusal=GEMMA_REFUSAL)
GEMMA3 = FamilySpec(attn_post_norm="post_attention_layernorm", mlp_pre_norm="pre_feedforward_layernorm",
                    mlp_post_norm="post_feedforward_layernorm", act_attr="hidden_activation", norm="rms_unit_offset",
                    attn_scale="query_pre_attn_scalar", final_softcap_attr="final_logit_softcapping",
                    embed_scale="sqrt_hidden", rope_per_layer_type=True, gguf_refusal=GEMMA_REFUSAL)
PHI3 = FamilySpec(fused_qkv="qkv_proj", fused_gate_up="gate_up_proj")
OLMO2 = FamilySpec(attn_pre_norm=None, attn_post_norm="post_attention_layernorm", mlp_pre_norm=None,
                   mlp_post_norm="post_feedforward_layernorm", qk_norm_scope="projection", norm="rms_weight_fp32",
                   gguf_refusal="norms after each block instead of before, a QK-norm over the whole projection")
GRANITE = FamilySpec(attn_scale="attention_multiplier", embed_scale="embedding_multiplier",
                     residual_scale_attr="residual_multiplier", logits_divisor_attr="logits_scaling")

# model_type (from the HF config) -> layout. Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms; neither changes
# which rows and columns form a head or a channel.
REGISTRY: dict[str, FamilySpec] = {
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "qwen3": LLAMA_LAYOUT,
    "phi": PHI,
    "opt": OPT,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA3,
    "phi3": PHI3,
    "olmo2": OLMO2,
    "granite": GRANITE,
}
MIXTURES_OF_EXPERTS = ("mixtral", "dbrx", "deepseek_v2", "deepseek_v3", "jamba", "arctic", "gpt_oss", "llama4")
EXTENDING = "README.md, 'Extending gisp': a FamilySpec entry, a tiny config, the conformance suite"


def family_spec(model_type: str) -> FamilySpec:
    """The layout of a model family, or a clear error naming the supported families and how to add one."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        hint = ""
        if model_type == "gemma3":
            hint = " (a multimodal Gemma 3 checkpoint: prune its text model, Gemma3ForCausalLM, model_type gemma3_text)"
        elif "moe" in model_type or model_type in MIXTURES_OF_EXPERTS:
            hint = (" (a mixture-of-experts model: its MLP is a set of routed experts, not the dense channels gisp "
                    "ranks; pruning experts is not implemented)")
        raise GispError(
            f"model family '{model_type}' is not supported{hint}; supported: {sorted(REGISTRY)}. A decoder whose "
            f"heads and MLP channels are rows and columns of its projections can be added as data: see {EXTENDING}"
        ) from None


def check_config(model_type: str, config) -> FamilySpec:
    """The family's spec, after checking that `config` (a transformers config or its dict) sets nothing the
    family's layout here does not compute (`FamilySpec.requires`)."""
    spec = family_spec(model_type)
    get = config.get if isinstance(config, dict) else (lambda name, default=None: getattr(config, name, default))
    for name, want in spec.requires:
        have = get(name, None)
        if isinstance(want, str) and want.startswith("@"):
            want = get(want[1:], None)
        if have is not None and want is not None and have != want:
            raise GispError(f"this {model_type} model sets {name}={have!r}; gisp's {model_type} layout computes "
                            f"{name}={want!r} only (as the family's common checkpoints do), so its pruning and export "
                            f"would not be exact. Supported variants: {EXTENDING}")
    return spec


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """`root.a.b.c` for path 'a.b.c' ('' is `root`), with an error that names the missing piece."""
    module = root
    for part in filter(None, path.split(".")):
        if not hasattr(module, part):
            raise GispError(f"{type(root).__name__} has no '{path}' (missing '{part}'): the registry entry is wrong")
        module = getattr(module, part)
    return module


class SplitLinear(nn.Module):
    """A fused projection as separate ones: the outputs of `parts` concatenated, exactly what the fused module gave
    (its rows were [part 0 | part 1 | ...]); each part is an ordinary nn.Linear that pruning, LoRA and the export
    see like any other projection."""

    def __init__(self, **parts: nn.Linear):
        super().__init__()
        self.names = tuple(parts)
        for name, linear in parts.items():
            self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, name)(x) for name in self.names], dim=-1)


def _split(fused: nn.Linear, sizes: dict[str, int]) -> SplitLinear:
    parts, start = {}, 0
    for name, rows in sizes.items():
        linear = nn.Linear(fused.in_features, rows, bias=fused.bias is not None, device=fused.weight.device,
                           dtype=fused.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(fused.weight[start:start + rows])
            if fused.bias is not None:
                linear.bias.copy_(fused.bias[start:start + rows])
        parts[name] = linear.requires_grad_(fused.weight.requires_grad)
        start += rows
    if start != fused.out_features:
        raise GispError(f"a fused projection of {fused.out_features} rows does not split into {sizes}")
    return SplitLinear(**parts)


def unfuse(model: nn.Module) -> nn.Module:
    """Split the fused projections of a family that has them (in place; exact): afterwards every family has the
    same separate q, k, v, gate, up projections. Models on the meta device are split on the meta device."""
    spec = family_spec(model.config.model_type)
    if not (spec.fused_qkv or spec.fused_gate_up):
        return model
    config = model.config
    n_heads, hidden = getattr(config, spec.n_heads_attr), getattr(config, spec.hidden_attr)
    n_kv = getattr(config, spec.n_kv_heads_attr, None) or n_heads
    head_dim = getattr(config, spec.head_dim_attr, None) or hidden // n_heads
    ffn = getattr(config, spec.ffn_attr)
    for layer in get_submodule(model, spec.layers):
        attn, mlp = get_submodule(layer, spec.attention), get_submodule(layer, spec.mlp)
        fused = getattr(attn, spec.fused_qkv, None) if spec.fused_qkv else None
        if isinstance(fused, nn.Linear):
            setattr(attn, spec.fused_qkv, _split(fused, {spec.q_proj: n_heads * head_dim,
                                                          spec.k_proj: n_kv * head_dim, spec.v_proj: n_kv * head_dim}))
        fused = getattr(mlp, spec.fused_gate_up, None) if spec.fused_gate_up else None
        if isinstance(fused, nn.Linear):
            setattr(mlp, spec.fused_gate_up, _split(fused, {spec.gate_proj: ffn, spec.up_proj: ffn}))
    return model


def projection(block: nn.Module, name: str, fused: str | None) -> nn.Module:
    """A projection of an attention / MLP block, also when it lives inside a split fused one."""
    if fused and isinstance(getattr(block, fused, None), SplitLinear):
        return getattr(getattr(block, fused), name)
    return get_submodule(block, name)
