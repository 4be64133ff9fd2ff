"""Model families as data: where the prunable structures live in each decoder architecture.

Every family-specific fact the pruning and export code needs is in one `FamilySpec`; there are no per-model code
paths. Adding a family that follows the Llama layout (Llama, Mistral, Qwen2, Qwen3, ...) is one registry entry
(plus a conf/model YAML); the random tiny models for tests can be built for every registered family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from gisp.errors import GispError


@dataclass(frozen=True)
class FamilySpec:
    """Names of the decoder pieces of one model family (attribute paths relative to the CausalLM)."""

    layers: str = "model.layers"  # ModuleList of decoder layers
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    # Names the physical export needs (relative to a decoder layer, or to the CausalLM for embed / final norm).
    input_norm: str = "input_layernorm"
    post_attention_norm: str = "post_attention_layernorm"
    q_norm: str = "q_norm"  # per-head query / key norms (Qwen3); absent in other families
    k_norm: str = "k_norm"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    # Config attribute names.
    n_heads_attr: str = "num_attention_heads"
    n_kv_heads_attr: str = "num_key_value_heads"
    head_dim_attr: str = "head_dim"
    hidden_attr: str = "hidden_size"
    ffn_attr: str = "intermediate_size"
    n_layers_attr: str = "num_hidden_layers"


LLAMA_LAYOUT = FamilySpec()

# model_type (from the HF config) -> layout. Qwen2 adds q/k/v biases, Qwen3 adds per-head q/k norms shared by all
# heads; neither changes which rows and columns form a head or a channel.
REGISTRY: dict[str, FamilySpec] = {
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "qwen3": LLAMA_LAYOUT,
}


def family_spec(model_type: str) -> FamilySpec:
    """The layout of a model family, or a clear error naming the supported families."""
    try:
        return REGISTRY[model_type]
    except KeyError:
        raise GispError(
            f"model family '{model_type}' is not supported; supported: {sorted(REGISTRY)}. "
            "Add a FamilySpec entry to gisp/models/families.py if its layers follow the Llama layout."
        ) from None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """`root.a.b.c` for path 'a.b.c', with an error that names the missing piece."""
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise GispError(f"{type(root).__name__} has no '{path}' (missing '{part}'): the registry entry is wrong")
        module = getattr(module, part)
    return module
