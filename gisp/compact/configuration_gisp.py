"""Config of a GISP-pruned Llama-family decoder (copied into exported folders; imports only transformers)."""

from __future__ import annotations

from transformers import PretrainedConfig


class GispDecoderConfig(PretrainedConfig):
    """A Llama/Mistral/Qwen2/Qwen3 decoder whose layers keep different numbers of heads and MLP channels.

    Per layer i: `layer_q_to_kv[i]` maps each kept query head to its kept KV head (len = kept query heads, an empty
    list = no attention block), `layer_kv_heads[i]` the kept KV heads, `layer_intermediate_sizes[i]` the kept MLP
    channels (0 = no MLP block). Which original heads and channels survived is in the folder's gisp_masks.safetensors.
    `output_bias`: o_proj and down_proj carry output biases (the model's own, or FLAP's compensation); a layer without
    attention (MLP) then adds its bias as a constant.
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
        qk_norm: bool = False,
        output_bias: bool = False,
        sliding_window: int | None = None,
        base_model_type: str = "llama",
        tie_word_embeddings: bool = False,
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
        self.qk_norm = qk_norm
        self.output_bias = output_bias
        self.sliding_window = sliding_window
        self.base_model_type = base_model_type
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
