"""Fused ops for ONNX Runtime lowering: attention with rotary and cache append, and RMSNorm with
the residual add. Each has an eager reference here and one ORT contrib node when lowered
(`skiptree.compiler.lower.onnx_contrib`).

`torch.ops.skiptree.group_query_attention` has the semantics of ONNX Runtime's contrib operator
`com.microsoft.GroupQueryAttention` (do_rotary=1, past and present sharing one buffer) as skiptree
uses it, so a verify graph traced with it lowers to one ORT node per layer instead of ~60 small
ones (reshapes, transposes, rotary halves, the cache scatter, the grouped score matmuls):

    query [B, T, H*D], key / value [B, T, Hkv*D]   projections, not yet rotated
    past_key / past_value [B, Hkv, S, D]           the layer's cache (S slots)
    seqlens_k int32 [B]                            cached tokens after this step, minus one
    total_sequence_length int32 []                 cached tokens after this step
    cos_cache / sin_cache [S, D/2]                 rotary tables: cos/sin(position * inv_freq)
    position_ids int64 [B, T]                      the tokens' positions (a tree node: prefix + depth)
    attention_bias [B, 1, T, S]                    additive (tree mask); sliced to the first total slots

It writes the T rotated keys and values at slots past..past+T-1 (past = seqlens_k + 1 - T) and
attends causally in slot order under the bias, so a tree whose nodes come in topological order
(parents first) is exact: a node's ancestors sit in earlier slots. Returns (out [B, T, H*D],
present_key, present_value). The eager implementation here is the reference the tests compare
ORT against; export sees only the op (its fake implementation gives the shapes).
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads*D] rotated by per-token cos/sin [B, T, D/2] (halves, not interleaved);
    returns [B, heads, T, D]."""
    batch, steps, _ = x.shape
    x = x.view(batch, steps, heads, -1)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    cos, sin = cos[:, :, None], sin[:, :, None]
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.transpose(1, 2)


@torch.library.custom_op("skiptree::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    past_key: torch.Tensor, past_value: torch.Tensor,
    seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    position_ids: torch.Tensor, attention_bias: torch.Tensor,
    num_heads: int, kv_num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    batch, steps, _ = query.shape
    dim = past_key.shape[-1]
    total = int(total_sequence_length)
    past = total - steps
    cos, sin = cos_cache[position_ids], sin_cache[position_ids]  # [B, T, D/2]
    q = rotate(query, num_heads, cos, sin)
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, past:total] = rotate(key, kv_num_heads, cos, sin)
    present_value[:, :, past:total] = value.view(batch, steps, kv_num_heads, dim).transpose(1, 2)
    groups = num_heads // kv_num_heads
    keys = present_key[:, :, :total].repeat_interleave(groups, dim=1)
    values = present_value[:, :, :total].repeat_interleave(groups, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * dim**-0.5 + attention_bias[..., :total]
    causal = torch.arange(total)[None, :] <= past + torch.arange(steps)[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values  # [B, H, T, D]
    return out.transpose(1, 2).reshape(batch, steps, num_heads * dim), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, *rest):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


@torch.library.custom_op("skiptree::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(RMSNorm(x + skip) * weight, x + skip): a residual add and the next norm in one op, ORT's
    `com.microsoft.SkipSimplifiedLayerNormalization` (float32, as the model's RMSNorm)."""
    total = x + skip
    normed = total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed, total


@skip_rms_norm.register_fake
def _(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def rotary_tables(inv_freq: torch.Tensor, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, D/2] of position * inv_freq for positions 0..S-1 (float32, as the model's rotary)."""
    angles = torch.arange(max_seq_len, dtype=torch.int64).to(inv_freq.dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()
