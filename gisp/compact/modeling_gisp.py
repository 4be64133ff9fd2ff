"""A decoder with per-layer head and channel counts (copied into exported folders).

Imports only torch and transformers, so `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` works
without gisp. One model for every supported family: what differs is data of the config (gisp.models.families),
and the numerics follow transformers' modeling files of each family:
- norms: RMSNorm (Llama: weight x normed input in the input dtype; OLMo 2: the product in float32; Gemma: x (1 + w)
  in float32) or LayerNorm with bias (Phi-2, OPT), before and / or after each block, or one shared by parallel
  attention and MLP blocks (Phi-2);
- attention: q/k/v biases, q/k norms per head or over the whole projection (OLMo 2: the pruned heads' q / k rows
  stay for that statistic and only the kept heads attend), the scale (1/sqrt(head_dim), Gemma's query_pre_attn_scalar,
  Granite's multiplier), Gemma 2's logit soft-capping, per-layer sliding windows, rotary positions (full or partial
  rotary, any of transformers' RoPE types, per layer type for Gemma 3) or learned absolute positions (OPT);
- MLP: gated (act(gate) x up) or plain (act(up)), any activation, biases;
- scales: Gemma's sqrt(hidden) embedding scale, Granite's embedding / residual / logit multipliers, final logit
  soft-capping, an output-layer bias (Phi-2).
GQA groups may be unequal after pruning: each kept query head reads its KV head through `q_to_kv` (an index, not
duplicated K/V weights), and KV heads no query head uses are gone, cache included. A layer with no heads has no
attention block; a layer with no channels has no MLP block (with `output_bias`, such a layer still adds that block's
output bias, a constant: what the masked model gave for zero input, after its post-norm when it has one).
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
    """`variant`: rms (Llama: the weight times the normed input cast back), rms_weight_fp32 (OLMo 2: the product in
    float32), rms_unit_offset (Gemma: x (1 + w) in float32)."""

    def __init__(self, size: int, eps: float, variant: str = "rms"):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if variant == "rms_unit_offset" else torch.ones(size))
        self.eps, self.variant = eps, variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.variant == "rms_unit_offset":
            return (h * (1.0 + self.weight.float())).to(dtype)
        if self.variant == "rms_weight_fp32":
            return (self.weight * h).to(dtype)
        return self.weight * h.to(dtype)


def make_norm(config: GispDecoderConfig, size: int) -> nn.Module:
    if config.norm == "layer":
        return nn.LayerNorm(size, eps=config.rms_norm_eps)
    return GispRMSNorm(size, config.rms_norm_eps, config.norm)


class GispRotary(nn.Module):
    """RoPE tables of one set of rope parameters (a layer type of Gemma 3 has its own). inv_freq is a plain
    attribute, not a buffer: from_pretrained builds models on the meta device and would leave a non-persistent
    buffer uninitialized. LongRoPE switches to its long factors past the original context, as transformers does."""

    def __init__(self, config: GispDecoderConfig, layer_type: str | None = None):
        super().__init__()
        self.config, self.layer_type = config, layer_type
        self._cache: dict[tuple, tuple[torch.Tensor, float]] = {}

    @property
    def parameters_(self) -> dict:
        rope = self.config.rope_parameters or {}
        return rope[self.layer_type] if self.layer_type is not None else rope

    def rotary_dim(self) -> int:
        return int(self.config.head_dim * self.parameters_.get("partial_rotary_factor", 1.0))

    def inv_freq(self, device: torch.device, seq_len: int) -> tuple[torch.Tensor, float]:
        params = self.parameters_
        rope_type = params.get("rope_type", "default")
        long = rope_type == "longrope" and seq_len > params["original_max_position_embeddings"]
        key = (device, long)
        if key not in self._cache:
            if rope_type == "default":
                dim, base = self.rotary_dim(), params["rope_theta"]
                inv_freq, scaling = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
            else:
                kwargs = {"layer_type": self.layer_type} if self.layer_type is not None else {}
                if long:
                    kwargs["seq_len"] = params["original_max_position_embeddings"] + 1
                inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.config, device, **kwargs)
            self._cache[key] = (inv_freq.to(device), scaling)
        return self._cache[key]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self.inv_freq(x.device, int(position_ids.max()) + 1)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, r/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, d); cos, sin (B, T, r): the first r dims rotate (partial rotary), the rest pass through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    rot = rot * cos.unsqueeze(1) + _rotate_half(rot) * sin.unsqueeze(1)
    return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


class GispAttention(nn.Module):
    def __init__(self, config: GispDecoderConfig, layer_idx: int, cache_idx: int):
        super().__init__()
        q_to_kv = config.layer_q_to_kv[layer_idx]
        n_q, n_kv, d, h = len(q_to_kv), config.layer_kv_heads[layer_idx], config.head_dim, config.hidden_size
        self.n_q, self.n_kv, self.head_dim, self.cache_idx = n_q, n_kv, d, cache_idx
        self.layer_type = (config.attention_types or [None] * config.num_hidden_layers)[layer_idx]
        self.sliding_window = config.attention_window if self.layer_type in (None, "sliding_attention") else None
        self.scaling = config.attn_scale if config.attn_scale is not None else d**-0.5
        self.softcap = config.attn_softcap
        # OLMo 2: the q / k norm runs over the whole projection, so q_proj / k_proj keep every head's rows for its
        # statistic and `heads` / `kv_heads` pick the kept ones afterwards
        self.statistic = config.qk_norm == "projection"
        rows_q = config.num_attention_heads if self.statistic else n_q
        rows_kv = config.num_key_value_heads if self.statistic else n_kv
        self.q_proj = nn.Linear(h, rows_q * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, rows_kv * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, n_kv * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(n_q * d, h, bias=getattr(config, "output_bias", False))
        if config.qk_norm == "projection":
            self.q_norm, self.k_norm = make_norm(config, rows_q * d), make_norm(config, rows_kv * d)
            self.heads = list(config.layer_q_heads[layer_idx])
            self.kv_heads = list(config.layer_kv_keep[layer_idx])
        elif config.qk_norm:
            self.q_norm, self.k_norm = make_norm(config, d), make_norm(config, d)
        self.q_to_kv = list(q_to_kv)  # a plain list, turned into a tensor per device (see GispRotary)
        self._index: dict[str, torch.Tensor] = {}
        self.equal_groups = n_kv > 0 and q_to_kv == [i * n_kv // n_q for i in range(n_q)] and n_q % n_kv == 0

    def _idx(self, name: str, values: list[int], device: torch.device) -> torch.Tensor:
        if name not in self._index or self._index[name].device != device:
            self._index[name] = torch.tensor(values, dtype=torch.long, device=device)
        return self._index[name]

    def forward(self, x, cos, sin, mask, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.statistic:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hq, T, d)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.statistic:
            q = q.index_select(1, self._idx("heads", self.heads, q.device))
            k = k.index_select(1, self._idx("kv_heads", self.kv_heads, k.device))
        elif hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.cache_idx)  # (B, Hkv, S, d): only the kept KV heads are cached
        if self.equal_groups:  # contiguous equal groups: a view-friendly repeat, as in transformers
            k = k.repeat_interleave(self.n_q // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_q // self.n_kv, dim=1)
        else:
            index = self._idx("q_to_kv", self.q_to_kv, k.device)
            k, v = k.index_select(1, index), v.index_select(1, index)  # (B, Hq, S, d)
        window = mask[self.sliding_window is not None]
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=window, scale=self.scaling)  # (B, Hq, T, d)
        else:  # Gemma 2: soft-capped logits (eager, as transformers computes them)
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling
            scores = torch.tanh(scores / self.softcap) * self.softcap
            scores = scores.masked_fill(~window, torch.finfo(scores.dtype).min)
            out = torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_q * self.head_dim))


class GispMLP(nn.Module):
    def __init__(self, config: GispDecoderConfig, size: int):
        super().__init__()
        h = config.hidden_size
        if config.mlp_gated:
            self.gate_proj = nn.Linear(h, size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(size, h, bias=getattr(config, "output_bias", False))
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class GispDecoderLayer(nn.Module):
    """Norms by role (config.layer_norms): attn_pre, attn_post (on the attention output), mlp_pre, mlp_post; with
    `parallel` the MLP reads the attention's input norm and both outputs are added to the same residual."""

    def __init__(self, config: GispDecoderConfig, layer_idx: int, cache_idx: int):
        super().__init__()
        h, bias = config.hidden_size, getattr(config, "output_bias", False)
        roles = set(config.layer_norms)
        self.parallel, self.residual_scale = config.parallel, config.residual_scale
        if config.layer_q_to_kv[layer_idx]:
            for role in ("attn_pre", "attn_post"):
                if role in roles:
                    setattr(self, NORM_NAMES[role], make_norm(config, h))
            self.self_attn = GispAttention(config, layer_idx, cache_idx)
        elif bias:
            self.attn_out_bias = nn.Parameter(torch.zeros(h))
        if config.layer_intermediate_sizes[layer_idx]:
            for role in ("mlp_pre", "mlp_post"):
                if role in roles:
                    setattr(self, NORM_NAMES[role], make_norm(config, h))
            if self.parallel and "attn_pre" in roles and not hasattr(self, "input_layernorm"):
                self.input_layernorm = make_norm(config, h)  # the shared norm, also when the attention is gone
            self.mlp = GispMLP(config, config.layer_intermediate_sizes[layer_idx])
        elif bias:
            self.mlp_out_bias = nn.Parameter(torch.zeros(h))

    def _norm(self, role: str, x: torch.Tensor) -> torch.Tensor:
        norm = getattr(self, NORM_NAMES[role], None)
        return norm(x) if norm is not None else x

    def forward(self, x, cos, sin, mask, cache):
        s = self.residual_scale
        if self.parallel:  # Phi-2: x + attn(norm(x)) + mlp(norm(x))
            normed = self._norm("attn_pre", x)
            out = x
            if hasattr(self, "self_attn"):
                out = out + self.self_attn(normed, cos, sin, mask, cache)
            elif hasattr(self, "attn_out_bias"):
                out = out + self.attn_out_bias
            if hasattr(self, "mlp"):
                out = out + self.mlp(normed)
            elif hasattr(self, "mlp_out_bias"):
                out = out + self.mlp_out_bias
            return out
        if hasattr(self, "self_attn"):
            x = x + self._norm("attn_post", self.self_attn(self._norm("attn_pre", x), cos, sin, mask, cache)) * s
        elif hasattr(self, "attn_out_bias"):
            x = x + self.attn_out_bias * s
        if hasattr(self, "mlp"):
            x = x + self._norm("mlp_post", self.mlp(self._norm("mlp_pre", x))) * s
        elif hasattr(self, "mlp_out_bias"):
            x = x + self.mlp_out_bias * s
        return x


# Module names of the norm roles: a Llama layer's two keep their names (exports of Llama-layout models are
# unchanged); the norms after a block's output (Gemma, OLMo 2) get their own
NORM_NAMES = {"attn_pre": "input_layernorm", "attn_post": "attn_output_layernorm",
               "mlp_pre": "post_attention_layernorm", "mlp_post": "mlp_output_layernorm"}


class GispDecoderPreTrainedModel(PreTrainedModel):
    config_class = GispDecoderConfig
    config: GispDecoderConfig
    base_model_prefix = "model"
    _no_split_modules = ["GispDecoderLayer"]  # noqa: RUF012 (transformers convention)
    _supports_sdpa = True
    supports_gradient_checkpointing = True  # transformers' switch sets GispDecoderModel.gradient_checkpointing

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, GispRMSNorm):
            module.weight.data.fill_(0.0 if module.variant == "rms_unit_offset" else 1.0)


class GispDecoderModel(GispDecoderPreTrainedModel):
    def __init__(self, config: GispDecoderConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.positions == "learned":  # OPT: absolute positions, looked up at position + offset
            self.embed_positions = nn.Embedding(config.max_position_embeddings + config.position_offset,
                                                config.hidden_size)
        cache_ids, slots = [], 0
        for heads in config.layer_q_to_kv:  # KV-cache slots only for the layers that still attend
            cache_ids.append(slots if heads else -1)
            slots += bool(heads)
        self.layers = nn.ModuleList(GispDecoderLayer(config, i, c) for i, c in enumerate(cache_ids))
        if config.final_norm:
            self.norm = make_norm(config, config.hidden_size)
        types = sorted({t for t in (config.attention_types or []) if t}) if config.rope_per_layer_type else []
        self.rotary = nn.ModuleDict({t: GispRotary(config, t) for t in types}) if types else None
        self.rotary_emb = GispRotary(config) if config.positions == "rope" and not types else None
        self.gradient_checkpointing = False  # recompute each layer in backward (training mode, gradients on)
        self.post_init()

    def _mask(self, attention_mask, B, T, past, device, window) -> torch.Tensor:
        """(B, 1, T, S) boolean: causal over absolute positions, within `window` if given, padding excluded, each
        query sees itself (a fully masked row would give NaN, and NaN times a zero attention weight is still NaN)."""
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = k_pos <= q_pos
        if window:
            allowed &= k_pos > q_pos - window
        allowed = allowed[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -S:].bool()
        return allowed | (k_pos == q_pos)[None, None]

    def _positions(self, attention_mask, B, T, past, device) -> torch.Tensor:
        if self.config.positions == "learned" and attention_mask is not None:  # OPT counts real tokens only
            pos = (torch.cumsum(attention_mask, dim=1) * attention_mask - 1).long()
            return pos[:, past:past + T].clamp(min=0) if pos.shape[1] >= past + T else pos[:, -T:].clamp(min=0)
        return torch.arange(past, past + T, device=device)[None].expand(B, T)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, h)
        if self.config.embed_scale != 1.0:  # Gemma rounds its sqrt(hidden) to the model's dtype, Granite does not
            scale = self.config.embed_scale
            x = x * (torch.tensor(scale, dtype=x.dtype) if self.config.embed_scale_in_dtype else scale)
        B, T, _ = x.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = self._positions(attention_mask, B, T, past, x.device)
        if self.config.positions == "learned":
            x = x + self.embed_positions(position_ids + self.config.position_offset)
        tables = {}
        if self.rotary is not None:
            tables = {t: rot(x, position_ids) for t, rot in self.rotary.items()}
        elif self.rotary_emb is not None:
            tables = {None: self.rotary_emb(x, position_ids)}
        masks = (self._mask(attention_mask, B, T, past, x.device, None),
                 self._mask(attention_mask, B, T, past, x.device, self.config.attention_window))
        types = self.config.attention_types or [None] * len(self.layers)
        for layer, layer_type in zip(self.layers, types):
            cos, sin = tables.get(layer_type if self.rotary is not None else None, (None, None))
            if self.gradient_checkpointing and layer.training and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, masks, past_key_values)
            else:
                x = layer(x, cos, sin, masks, past_key_values)
        return (self.norm(x) if hasattr(self, "norm") else x), past_key_values


class GispDecoderForCausalLM(GispDecoderPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: GispDecoderConfig):
        super().__init__(config)
        self.model = GispDecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        # LongRoPE (Phi-3) switches to its long factors past the original context: as transformers' Phi-3 does, the
        # cache of keys rotated with the short factors is dropped once, the first time the sequence crosses it
        rope = self.config.rope_parameters or {}
        original = rope.get("original_max_position_embeddings") if rope.get("rope_type") == "longrope" else None
        key = "cache" if "cache" in kwargs else "past_key_values"
        cache = kwargs.get(key)
        if original and cache is not None and input_ids.shape[1] > original and cache.get_seq_length() <= original:
            kwargs[key] = None
            kwargs["next_sequence_length"] = None
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, cache=None, **kwargs):
        # transformers >= 5.2x passes the KV cache as `cache` (older releases: `past_key_values`); accept both, or
        # generation would silently run every step without its past.
        past = cache if cache is not None else past_key_values
        hidden, cache = self.model(input_ids, attention_mask, position_ids, past, inputs_embeds, use_cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if self.config.logits_divisor != 1.0:  # Granite
            logits = logits / self.config.logits_divisor
        if self.config.final_softcap is not None:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)


__all__ = ["NORM_NAMES", "GispDecoderForCausalLM", "GispDecoderModel"]
