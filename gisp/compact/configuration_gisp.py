"""Config of a GISP-pruned decoder (copied into exported folders; imports only transformers)."""

from __future__ import annotations

from transformers import PretrainedConfig

# Norm roles of a decoder layer (`layer_norms`); the compact model names them as a Llama layer does where it can
NORM_ROLES = ("attn_pre", "attn_post", "mlp_pre", "mlp_post")


class GispDecoderConfig(PretrainedConfig):
    """A decoder whose layers keep different numbers of heads and MLP channels.

    Per layer i: `layer_q_to_kv[i]` maps each kept query head to its kept KV head (len = kept query heads, an empty
    list = no attention block), `layer_kv_heads[i]` the kept KV heads, `layer_intermediate_sizes[i]` the kept MLP
    channels (0 = no MLP block). Which original heads and channels survived is in the folder's gisp_masks.safetensors.
    `output_bias`: o_proj and down_proj carry output biases (the model's own, or FLAP's compensation); a layer without
    attention (MLP) then adds its bias as a constant.

    The family's computation is data (defaults: a Llama layer, so exports written before these fields load as they
    were): `norm` (rms | rms_weight_fp32 | rms_unit_offset | layer), `layer_norms` (the roles a layer has), `parallel`
    (attention and MLP from one norm, Phi-2), `qk_norm` (False | "head" | "projection"; True = "head"),
    `layer_q_heads` / `layer_kv_keep` (the kept heads' indices, for "projection"), `attn_scale` (None:
    1/sqrt(head_dim)), `attn_softcap`, `final_softcap`, `attention_window` and `attention_types` (sliding / full
    attention per layer), `rope_per_layer_type`, `positions` (rope | learned) and `position_offset`, `embed_scale`
    (`embed_scale_in_dtype`: rounded to the model's dtype first, as Gemma does), `residual_scale`, `logits_divisor`,
    `lm_head_bias`, `final_norm`, `mlp_gated`.
    """

    model_type = "gisp_decoder"
    keys_to_ignore_at_inference = ["past_key_values"]  # noqa: RUF012 (transformers convention)

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        head_dim: int = 128,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 32,
        layer_q_to_kv: list[list[int]] | None = None,
        layer_kv_heads: list[int] | None = None,
        layer_intermediate_sizes: list[int] | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 4096,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool | str = False,
        output_bias: bool = False,
        attention_window: int | None = None,
        base_model_type: str = "llama",
        tie_word_embeddings: bool = False,
        norm: str = "rms",
        layer_norms: list[str] | None = None,
        parallel: bool = False,
        layer_q_heads: list[list[int]] | None = None,
        layer_kv_keep: list[list[int]] | None = None,
        attn_scale: float | None = None,
        attn_softcap: float | None = None,
        final_softcap: float | None = None,
        attention_types: list[str] | None = None,
        rope_per_layer_type: bool = False,
        positions: str = "rope",
        position_offset: int = 0,
        embed_scale: float = 1.0,
        residual_scale: float = 1.0,
        logits_divisor: float = 1.0,
        embed_scale_in_dtype: bool = False,
        lm_head_bias: bool = False,
        final_norm: bool = True,
        mlp_gated: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.head_dim = head_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads  # of the dense model (for RoPE and reference only)
        self.num_key_value_heads = num_key_value_heads
        self.layer_q_to_kv = layer_q_to_kv if layer_q_to_kv is not None else [[]] * num_hidden_layers
        self.layer_kv_heads = layer_kv_heads if layer_kv_heads is not None else [0] * num_hidden_layers
        self.layer_intermediate_sizes = layer_intermediate_sizes or [0] * num_hidden_layers
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = "head" if qk_norm is True else (qk_norm or False)
        self.output_bias = output_bias
        # Named so that transformers' generic cache code does not build sliding-window cache layers (which would not
        # line up with this model's per-layer cache slots): the model masks the window itself. Exports written
        # before the rename stored `sliding_window`.
        legacy_window = kwargs.pop("sliding_window", None)
        self.attention_window = attention_window if attention_window is not None else legacy_window
        self.base_model_type = base_model_type
        self.norm = norm
        self.layer_norms = list(layer_norms) if layer_norms is not None else ["attn_pre", "mlp_pre"]
        unknown = set(self.layer_norms) - set(NORM_ROLES)
        if unknown:
            raise ValueError(f"layer_norms {sorted(unknown)} unknown; roles: {NORM_ROLES}")
        self.parallel = parallel
        self.layer_q_heads = layer_q_heads
        self.layer_kv_keep = layer_kv_keep
        self.attn_scale = attn_scale
        self.attn_softcap = attn_softcap
        self.final_softcap = final_softcap
        self.attention_types = attention_types  # sliding_attention / full_attention per layer (None: all sliding)
        self.rope_per_layer_type = rope_per_layer_type
        if rope_per_layer_type:  # transformers reads nested RoPE parameters by these labels (else: by layer_types,
            self._rope_type_labels = sorted(self.rope_parameters)  # which this config does not have; see above)
        self.positions = positions
        self.position_offset = position_offset
        self.embed_scale = embed_scale
        self.residual_scale = residual_scale
        self.logits_divisor = logits_divisor
        self.embed_scale_in_dtype = embed_scale_in_dtype
        self.lm_head_bias = lm_head_bias
        self.final_norm = final_norm
        self.mlp_gated = mlp_gated
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
