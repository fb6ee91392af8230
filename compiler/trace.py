"""Trace a model definition's step function with `torch.export` into the IR.

One graph, "step", serves prefill (T = prompt chunk) and decode (T = 1): T is a named dynamic
dimension, S = max_seq_len is static (the preallocated cache), so the graph's shapes are fixed
except for the token count.
"""

from __future__ import annotations

import torch
from torch import nn

from skiptree.compiler.ir import ModelIR, StepGraph, TensorSpec, build_block_view
from skiptree.models.base import CausalLM

STEP_INPUTS = ("input_ids", "positions", "attn_bias", "k_cache", "v_cache", "write_slots")


class StepModule(nn.Module):
    """The exported entry point: one step, returning logits and the updated caches.

    The caches are written in place (`index_copy_`) and also returned, so lowering can alias each
    cache output with its input and the runtime never copies them.
    """

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, positions, attn_bias, k_cache, v_cache, write_slots):
        logits = self.model(input_ids, positions, attn_bias, k_cache, v_cache, write_slots)
        return logits, k_cache, v_cache


def example_step_inputs(model: CausalLM, max_seq_len: int, steps: int = 2) -> tuple[torch.Tensor, ...]:
    """Inputs of a `steps`-token step at the start of the sequence (values do not matter)."""
    k_cache, v_cache = model.new_kv_cache(1, max_seq_len)
    dtype = k_cache.dtype
    positions = torch.arange(steps)
    return (
        torch.zeros(1, steps, dtype=torch.int64),
        positions[None],
        torch.zeros(1, 1, steps, max_seq_len, dtype=dtype),
        k_cache,
        v_cache,
        positions,
    )


def _spec(name: str, value: torch.Tensor, dynamic_dims: dict[int, str]) -> TensorSpec:
    shape = tuple(dynamic_dims.get(i, int(size)) for i, size in enumerate(value.shape))
    return TensorSpec(name, str(value.dtype).removeprefix("torch."), shape)


def trace_step(model: CausalLM, max_seq_len: int) -> StepGraph:
    """Export the step function with T dynamic in [1, max_seq_len]."""
    tokens = torch.export.Dim("T", min=1, max=max_seq_len)
    dynamic = {"input_ids": {1: tokens}, "positions": {1: tokens}, "attn_bias": {2: tokens},
               "k_cache": None, "v_cache": None, "write_slots": {0: tokens}}  # fmt: skip
    example = example_step_inputs(model, max_seq_len)
    with torch.no_grad():
        program = torch.export.export(StepModule(model), example, dynamic_shapes=dynamic, strict=False)
    dims = {"input_ids": {1: "T"}, "positions": {1: "T"}, "attn_bias": {2: "T"}, "write_slots": {0: "T"}}
    inputs = [_spec(name, value, dims.get(name, {}))
              for name, value in zip(STEP_INPUTS, example, strict=True)]  # fmt: skip
    logits = TensorSpec("logits", inputs[3].dtype, (1, "T", model.config.vocab_size))
    outputs = [logits, TensorSpec("k_cache_out", inputs[3].dtype, inputs[3].shape),
               TensorSpec("v_cache_out", inputs[4].dtype, inputs[4].shape)]  # fmt: skip
    return StepGraph("step", program, inputs, outputs, {"k_cache_out": "k_cache", "v_cache_out": "v_cache"})


def trace_model(model: CausalLM, max_seq_len: int) -> ModelIR:
    """The IR of a model: its traced step graph and its block view."""
    if max_seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds the model's context {model.config.max_position_embeddings}"
        )
    graphs = {"step": trace_step(model, max_seq_len)}
    return ModelIR(model.config, model, max_seq_len, graphs, build_block_view(model.config, graphs))
