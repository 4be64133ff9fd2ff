"""A Llama-family decoder with per-layer head and channel counts (copied into exported folders).

Imports only torch and transformers, so `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`
works without gisp. Numerics follow transformers' Llama/Mistral/Qwen2/Qwen3 (RMSNorm in float32, rotate-half
RoPE, SiLU-gated MLP). GQA groups may be unequal after pruning: each kept query head reads its KV head through
`q_to_kv` (an index, not duplicated K/V weights), and KV heads no query head uses are gone, cache included.
A layer with no heads has no attention block; a layer with no channels has no MLP block (with `output_bias`, such a
layer still adds that block's output bias, a constant: what the masked model's o_proj / down_proj gave for zero input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

try:
    from .configuration_gisp import GispDecoderConfig
except ImportError:  # imported as a top-level module
    from configuration_gisp import GispDecoderConfig


class GispRMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GispRotary(nn.Module):
    """RoPE tables. inv_freq is a plain attribute, not a buffer: from_pretrained builds models on the meta device
    and would leave a non-persistent buffer uninitialized."""

    def __init__(self, config: GispDecoderConfig):
        super().__init__()
        self.config = config
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            rope_type = self.config.rope_parameters.get("rope_type", "default")
            if rope_type == "default":
                base, dim = self.config.rope_parameters["rope_theta"], self.config.head_dim
                inv_freq, self.scaling = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
            else:
                inv_freq, self.scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config)
            self._inv_freq = inv_freq.to(device)
        return self._inv_freq

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq(x.device)  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(x.dtype), (emb.sin() * self.scaling).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)  # x (B, H, T, d), cos (B, T, d)


class GispAttention(nn.Module):
    def __init__(self, config: GispDecoderConfig, layer_idx: int, cache_idx: int):
        super().__init__()
        q_to_kv = config.layer_q_to_kv[layer_idx]
        n_q, n_kv, d, h = len(q_to_kv), config.layer_kv_heads[layer_idx], config.head_dim, config.hidden_size
        self.n_q, self.n_kv, self.head_dim, self.cache_idx = n_q, n_kv, d, cache_idx
        self.sliding_window = config.sliding_window
        self.q_proj = nn.Linear(h, n_q * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, n_kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, n_kv * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(n_q * d, h, bias=getattr(config, "output_bias", False))
        if config.qk_norm:
            self.q_norm, self.k_norm = GispRMSNorm(d, config.rms_norm_eps), GispRMSNorm(d, config.rms_norm_eps)
        self.q_to_kv = list(q_to_kv)  # a plain list, turned into a tensor per device (see GispRotary)
        self._index: torch.Tensor | None = None
        self.equal_groups = n_kv > 0 and q_to_kv == [i * n_kv // n_q for i in range(n_q)] and n_q % n_kv == 0

    def forward(self, x, cos, sin, mask, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_q, self.head_dim).transpose(1, 2)  # (B, Hq, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_idx)  # (B, Hkv, S, d): only the kept KV heads are cached
        if self.equal_groups:  # contiguous equal groups: a view-friendly repeat, as in transformers
            k = k.repeat_interleave(self.n_q // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_q // self.n_kv, dim=1)
        else:
            if self._index is None or self._index.device != k.device:
                self._index = torch.tensor(self.q_to_kv, dtype=torch.long, device=k.device)
            k, v = k.index_select(1, self._index), v.index_select(1, self._index)  # (B, Hq, S, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hq, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_q * self.head_dim))


class GispMLP(nn.Module):
    def __init__(self, config: GispDecoderConfig, size: int):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(size, h, bias=getattr(config, "output_bias", False))
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GispDecoderLayer(nn.Module):
    def __init__(self, config: GispDecoderConfig, layer_idx: int, cache_idx: int):
        super().__init__()
        eps, h, bias = config.rms_norm_eps, config.hidden_size, getattr(config, "output_bias", False)
        if config.layer_q_to_kv[layer_idx]:
            self.input_layernorm = GispRMSNorm(h, eps)
            self.self_attn = GispAttention(config, layer_idx, cache_idx)
        elif bias:
            self.attn_out_bias = nn.Parameter(torch.zeros(h))
        if config.layer_intermediate_sizes[layer_idx]:
            self.post_attention_layernorm = GispRMSNorm(h, eps)
            self.mlp = GispMLP(config, config.layer_intermediate_sizes[layer_idx])
        elif bias:
            self.mlp_out_bias = nn.Parameter(torch.zeros(h))

    def forward(self, x, cos, sin, mask, cache):
        if hasattr(self, "self_attn"):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        elif hasattr(self, "attn_out_bias"):
            x = x + self.attn_out_bias
        if hasattr(self, "mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x))
        elif hasattr(self, "mlp_out_bias"):
            x = x + self.mlp_out_bias
        return x


class GispDecoderPreTrainedModel(PreTrainedModel):
    config_class = GispDecoderConfig
    config: GispDecoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["GispDecoderLayer"]  # noqa: RUF012 (transformers convention)
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, GispRMSNorm):
            module.weight.data.fill_(1.0)


class GispDecoderModel(GispDecoderPreTrainedModel):
    def __init__(self, config: GispDecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        cache_ids, slots = [], 0
        for heads in config.layer_q_to_kv:  # KV-cache slots only for the layers that still attend
            cache_ids.append(slots if heads else -1)
            slots += bool(heads)
        self.layers = nn.ModuleList(GispDecoderLayer(config, i, c) for i, c in enumerate(cache_ids))
        self.norm = GispRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = GispRotary(config)
        self.post_init()

    def _mask(self, attention_mask, B, T, past, device) -> torch.Tensor:
        """(B, 1, T, S) boolean: causal over absolute positions, padding excluded, each query sees itself (a fully
        masked row would give NaN, and NaN times a zero attention weight is still NaN)."""
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = k_pos <= q_pos
        if self.config.sliding_window:
            allowed &= k_pos > q_pos - self.config.sliding_window
        allowed = allowed[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -S:].bool()
        return allowed | (k_pos == q_pos)[None, None]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, h)
        B, T, _ = x.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        cos, sin = self.rotary_emb(x, position_ids)
        mask = self._mask(attention_mask, B, T, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, past_key_values)
        return self.norm(x), past_key_values


class GispDecoderForCausalLM(GispDecoderPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: GispDecoderConfig):
        super().__init__(config)
        self.model = GispDecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, cache=None, **kwargs):
        # transformers >= 5.2x passes the KV cache as `cache` (older releases: `past_key_values`); accept both, or
        # generation would silently run every step without its past.
        past = cache if cache is not None else past_key_values
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past, inputs_embeds, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)
