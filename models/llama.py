"""The Llama family: Llama 2/3, SmolLM2 (model_type llama), Qwen2 (q/k/v biases).

RMSNorm -> attention with rotary positions and grouped-query K/V -> RMSNorm -> SwiGLU MLP,
pre-norm residuals, final RMSNorm, output head (tied to the embedding or not).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from skiptree.models.base import CausalLM, WeightSpec, attend
from skiptree.models.config import ModelConfig, RopeConfig
from skiptree.models.fused_ops import group_query_attention, skip_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as transformers does (even for float64 models), then cast back.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/D), adjusted for linear or llama3 context scaling. [D/2] float32.

    Computed in float32 exactly as transformers does, so positions rotate bit-identically.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.scaling == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling == "llama3":
        # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(middle, blended, inv_freq)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, q_size, bias=cfg.attention_bias)
        self.k = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.v = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.o = nn.Linear(q_size, cfg.hidden_size, bias=False)

    def kv(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """k (rotated), v: [B, Hkv, T, D] of normed hidden states x."""
        batch, steps, _ = x.shape
        k = self.k(x).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(batch, steps, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k * cos + rotate_half(k) * sin, v

    def forward(self, x, cos, sin, attn_bias, k_cache, v_cache, write_slots) -> torch.Tensor:
        batch, steps, _ = x.shape
        q = self.q(x).view(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        q = q * cos + rotate_half(q) * sin
        k, v = self.kv(x, cos, sin)
        return self.o(attend(q, k, v, k_cache, v_cache, write_slots, attn_bias))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"Llama MLP expects silu, got {cfg.hidden_act}")
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def kv(self, x, context) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attn.kv(self.attn_norm(x), *context)

    def forward(self, x, context, attn_bias, k_cache, v_cache, write_slots) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), *context, attn_bias, k_cache, v_cache, write_slots)
        return x + self.mlp(self.mlp_norm(x))


class Llama(CausalLM):
    """A Llama-family decoder; see `skiptree.models.base` for the step contract."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        inv_freq = rope_inverse_frequencies(self.config.rope, self.config.head_dim)
        self.inv_freq = inv_freq.to(self.embed.weight.device)

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, D] for the given absolute positions [B, T]."""
        angles = positions[..., None].to(self.inv_freq.dtype) * self.inv_freq  # [B, T, D/2]
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def embed_step(self, input_ids, positions):
        x = self.embed(input_ids)
        return x, self.layer_context(positions, x.dtype)

    def layer_context(self, positions, dtype):
        return self.rotary(positions, dtype)

    def supports_fused_attention(self) -> bool:
        # ORT's GroupQueryAttention: float32 here (the CPU kernel has float/float16), head size a
        # multiple of 16, rotary over the whole head (every Llama-family config we load).
        return self.embed.weight.dtype == torch.float32 and self.config.head_dim % 16 == 0

    def run_layer_fused(self, index, x, pending, attention, k_cache, v_cache):
        layer = self.layers[index]
        attn = layer.attn
        if pending is None:
            normed = layer.attn_norm(x)
        else:
            normed, x = skip_rms_norm(x, pending, layer.attn_norm.weight, layer.attn_norm.eps)
        query, key, value = attn.q(normed), attn.k(normed), attn.v(normed)
        out, k_cache, v_cache = group_query_attention(query, key, value, k_cache, v_cache, *attention,
                                                      attn.num_heads, attn.num_kv_heads)  # fmt: skip
        normed, x = skip_rms_norm(x, attn.o(out), layer.mlp_norm.weight, layer.mlp_norm.eps)
        return x, layer.mlp(normed), k_cache, v_cache

    def finish_fused(self, x, pending):
        normed, x = skip_rms_norm(x, pending, self.norm.weight, self.norm.eps)
        return self.head(normed), x

    def hf_weights(self) -> dict[str, WeightSpec]:
        names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        if not self.config.tie_word_embeddings:
            names["head.weight"] = "lm_head.weight"
        ours_to_hf = {
            "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
            "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
            "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
            "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj",
        }  # fmt: skip
        for name, _ in self.named_parameters():
            if name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                module, leaf = rest.rsplit(".", 1)
                names[name] = f"model.layers.{index}.{ours_to_hf[module]}.{leaf}"
        return {ours: WeightSpec(hf) for ours, hf in names.items()}
