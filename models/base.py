"""The contract every model definition in skiptree meets, so the compiler can trace any of them.

A step is one pure function of its inputs:

    logits = model(input_ids, positions, attn_bias, k_cache, v_cache, write_slots)

    input_ids   int64 [B, T]          tokens of this step (a prompt chunk, one token, or a tree)
    positions   int64 [B, T]          their absolute positions (a tree node: prefix length + depth)
    attn_bias   float [B, 1, T, S]    additive: 0 where token t may attend cache slot s, -inf-like
                                      (`mask_value(dtype)`) elsewhere; causal, tree, anything
    k_cache     L tensors [B, Hkv, S, D] (a list, or the rows of one [L, B, Hkv, S, D] tensor),
    v_cache     preallocated to S = max_seq_len slots; one tensor per layer so a lowered graph
                has one cache input per layer and never gathers (copies) a layer out of a stack
    write_slots int64 [T] or [B, T]   cache slot that receives token t's K/V (written in place
                                      before attention, so a token can attend itself)
    logits      float [B, T, V]

No Python control flow depends on tensor values, so `torch.export` sees one graph for all inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skiptree.models.config import ModelConfig


def mask_value(dtype: torch.dtype) -> float:
    """The additive bias of a forbidden (query, key) pair: finite, so a row never turns into NaN."""
    return torch.finfo(dtype).min


@dataclass(frozen=True)
class WeightSpec:
    """Where one of our parameters comes from in an HF checkpoint, and how to turn it into ours."""

    hf_name: str
    transpose: bool = False  # GPT-2's Conv1D stores [in, out]; nn.Linear wants [out, in]


class CausalLM(nn.Module):
    """Base of the model definitions: a config, the step forward, a KV cache allocator."""

    config: ModelConfig

    def new_kv_cache(
        self, batch: int, max_seq_len: int, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed K and V caches `[L, B, Hkv, S, D]` for `max_seq_len` slots."""
        cfg = self.config
        dtype = dtype or next(self.parameters()).dtype
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_seq_len, cfg.head_dim)
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def finish_loading(self) -> None:
        """After weights were assigned in place of meta tensors: re-tie the head, rebuild buffers."""
        if self.config.tie_word_embeddings:
            self.head.weight = self.embed.weight
        self.reset_buffers()
        leftover = [name for name, t in self.state_dict(keep_vars=True).items() if t.is_meta]
        assert not leftover, f"parameters never loaded: {leftover}"

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (none by default)."""

    def hf_weights(self) -> dict[str, WeightSpec]:
        """Our parameter name -> its source in a Hugging Face state dict."""
        raise NotImplementedError

    # The step as layers, so passes can run a subset (SkipLayers) or stop early (InsertEarlyExit):
    #   x, context = embed_step(ids, positions); x = run_layer(i, x, context, ...) for each i;
    #   logits = finish(x). `context` is what every layer needs besides x (Llama: rotary cos/sin).

    def embed_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        raise NotImplementedError

    def layer_context(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple:
        """What the layers need besides hidden states, for tokens at `positions` [B, T]."""
        return ()

    def run_layer(self, index: int, x: torch.Tensor, context: tuple, attn_bias: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, write_slots: torch.Tensor
                  ) -> torch.Tensor:  # fmt: skip
        """Layer `index` on hidden states x [B, T, H]; writes its K/V for the T tokens in place."""
        return self.layers[index](x, context, attn_bias, k_cache, v_cache, write_slots)

    def layer_kv(self, index: int, x: torch.Tensor, context: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V [B, Hkv, T, D] layer `index` would write if its input were x (CALM's state
        propagation computes the K/V of skipped layers this way from an exit's hidden state)."""
        return self.layers[index].kv(x, context)

    # Fused ops (ONNX Runtime lowering, `skiptree.models.fused_ops`): a family that supports them
    # runs a layer through one `group_query_attention` op (returning its caches) and adds each
    # sublayer's output to the residual stream inside the next norm (`skip_rms_norm`), so a fused
    # layer takes and returns the stream as (x, pending): the true stream is x + pending.

    def supports_fused_attention(self) -> bool:
        """Whether `run_layer_fused` exists for this model (family, dtype and head size allow it)."""
        return False

    def run_layer_fused(self, index: int, x: torch.Tensor, pending: torch.Tensor | None, attention: tuple,
                        k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple:  # fmt: skip
        """Layer `index` with fused ops on the stream x + pending (None: nothing pending);
        `attention` = the attention op's (seqlens_k, total_sequence_length, cos_cache, sin_cache,
        position_ids, attention_bias). Returns (x, pending, new K cache, new V cache)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused attention")

    def finish_fused(self, x: torch.Tensor, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`finish` of the stream x + pending: (logits, the stream itself)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused attention")

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and output head: hidden states [B, T, H] -> logits [B, T, V]."""
        return self.head(self.norm(x))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_bias: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        write_slots: torch.Tensor,
    ) -> torch.Tensor:
        x, context = self.embed_step(input_ids, positions)
        for i in range(self.config.num_layers):
            x = self.run_layer(i, x, context, attn_bias, k_cache[i], v_cache[i], write_slots)
        return self.finish(x)


def attend(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_slots: torch.Tensor,
    attn_bias: torch.Tensor,
) -> torch.Tensor:
    """Write this step's K/V into one layer's cache, then attend over every slot under the bias.

    q: [B, H, T, D]; k_new, v_new: [B, Hkv, T, D]; k_cache, v_cache: [B, Hkv, S, D], updated in
    place; attn_bias: [B, 1, T, S]. Returns [B, T, H * D].

    The write indexes all four dims (TVM's importer wants one index per dim); ONNX gets one
    ScatterND per cache, whose output the runtime aliases with its input: no copy. Grouped-query
    attention groups the queries ([B, Hkv, G*T, D]) instead of repeating K/V, so the cache is never
    copied either.
    """
    batch, heads, steps, dim = q.shape
    kv_heads = k_cache.shape[1]
    groups = heads // kv_heads
    index = (
        torch.arange(batch).view(batch, 1, 1, 1),
        torch.arange(kv_heads).view(1, kv_heads, 1, 1),
        write_slots.view(-1, 1, steps, 1) if write_slots.dim() == 2 else write_slots.view(1, 1, steps, 1),
        torch.arange(dim).view(1, 1, 1, dim),
    )
    k_cache.index_put_(index, k_new)
    v_cache.index_put_(index, v_new)
    # Scores as a 3-D bmm over (B * Hkv): TVM fuses K's transpose into the matmul (reads K as
    # stored) only when nothing stands between them, and a 4-D matmul brings broadcasts (a copy of
    # K per layer and step). V stays 4-D: a bmm over a flattened V cache exported wrong inside
    # early exit's `If` branches (tests/passes/test_insert_early_exit.py caught it).
    grouped = (q * dim**-0.5).reshape(batch * kv_heads, groups * steps, dim)
    scores = torch.bmm(grouped, k_cache.flatten(0, 1).transpose(1, 2))
    scores = scores.view(batch, kv_heads, groups, steps, -1)
    weights = torch.softmax(scores + attn_bias.unsqueeze(1), dim=-1)
    out = weights.view(batch, kv_heads, groups * steps, -1) @ v_cache  # [B, Hkv, G*T, D]
    # permute, then reshape: a view of the grouped layout breaks export's dynamic-T guards.
    return out.view(batch, kv_heads, groups, steps, dim).permute(0, 3, 1, 2, 4).reshape(
        batch, steps, heads * dim
    )
