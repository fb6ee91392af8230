"""Trace a model definition's step function with `torch.export` into the IR.

One graph, "step", serves prefill (T = prompt chunk) and decode (T = 1): T is a named dynamic
dimension, S = max_seq_len is static (the preallocated cache), so the graph's shapes are fixed
except for the token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from skiptree.compiler.ir.graph import ModelIR, StepGraph, TensorSpec, build_block_view
from skiptree.models.base import CausalLM
from skiptree.runtime.manifest import GraphName

STEP_INPUTS = ("input_ids", "positions", "attn_bias", "write_slots")


def cache_names(layers: int | Sequence[int]) -> list[str]:
    """Names of the per-layer cache inputs: k{i} for each layer i, then v{i} (all L layers for an int).
    A graph that runs a subset of layers names its caches by the layers' own indices, so the
    runtime binds them to the target's buffers of those layers."""
    layers = range(layers) if isinstance(layers, int) else layers
    return [f"k{i}" for i in layers] + [f"v{i}" for i in layers]


class StepModule(nn.Module):
    """The exported entry point: one step -> (logits, next_ids, updated caches...).

    Caches come as 2L per-layer inputs (k0..k{L-1}, v0..v{L-1}); the model writes them in place
    and they are returned too, because ONNX export drops in-place updates of inputs that are not
    outputs. The runtime binds each cache output to its input's buffer, so nothing is copied.
    `next_ids` (argmax per position) lets greedy decoding skip shipping logits to the host.
    """

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_layers

    def forward(self, input_ids, positions, attn_bias, write_slots, *caches):
        k_cache, v_cache = caches[: self.num_layers], caches[self.num_layers :]
        logits = self.model(input_ids, positions, attn_bias, k_cache, v_cache, write_slots)
        return (logits, logits.argmax(-1), *caches)


def example_step_inputs(model: CausalLM, max_seq_len: int, steps: int = 3) -> tuple[torch.Tensor, ...]:
    """Inputs of a `steps`-token step at the start of the sequence (values do not matter).

    `steps` must be >= 2 and differ from the model's small dims: an example with T = 1 makes
    export specialise T to the constant 1.
    Every input is its own tensor, never a view: export records guards on a view's `_base`
    (and on aliasing), which then fail on the real inputs.
    """
    caches = example_caches(model, max_seq_len)
    return (
        torch.zeros(1, steps, dtype=torch.int64),
        torch.arange(steps).reshape(1, steps).clone(),
        torch.zeros(1, 1, steps, max_seq_len, dtype=caches[0].dtype),
        torch.arange(steps),
        *caches,
    )


def example_caches(model: CausalLM, max_seq_len: int, layers: Sequence[int] | None = None, batch: int = 1
                   ) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """k{i}, then v{i} for each layer i (default all): zeroed caches, each its own tensor (not a view)."""
    k_cache, v_cache = model.new_kv_cache(batch, max_seq_len)
    layers = range(model.config.num_layers) if layers is None else layers
    return (*(k_cache[i].clone() for i in layers), *(v_cache[i].clone() for i in layers))


def _spec(name: str, value: torch.Tensor, dynamic_dims: dict[int, str]) -> TensorSpec:
    shape = tuple(dynamic_dims.get(i, int(size)) for i, size in enumerate(value.shape))
    return TensorSpec(name, str(value.dtype).removeprefix("torch."), shape)


def export_with_caches(
    name: str,
    module: nn.Module,
    inputs: list[tuple[str, torch.Tensor, dict[int, str]]],
    caches: tuple[torch.Tensor, ...],
    outputs: list[TensorSpec],
    max_tokens: int,
    layers: Sequence[int] | None = None,
    max_batch: int | None = None,
) -> StepGraph:
    """Export `module(*inputs, *caches) -> (*outputs, *updated caches)` into a `StepGraph`.

    `inputs` are (name, example, {dim: "T"}); every dim named "T" is one dynamic token count in
    [1, max_tokens], every dim named "B" one dynamic batch in [1, max_batch] (the caches' first dim
    too). The caches (k{i}, then v{i}, for `layers`, default all) are updated in place and returned.
    """
    named = {"T": torch.export.Dim("T", min=1, max=max(max_tokens, 2))}  # unused by static graphs
    if max_batch:
        named["B"] = torch.export.Dim("B", min=1, max=max_batch)
    cache_dims = {0: "B"} if max_batch else {}
    # positional (the forward's argument names may differ from the input names), caches last
    dynamic = (*({dim: named[name] for dim, name in dims.items()} or None for _, _, dims in inputs),
               tuple({dim: named[name] for dim, name in cache_dims.items()} or None for _ in caches))
    example = (*(value for _, value, _ in inputs), *caches)
    program = torch.export.export(module.eval(), example, dynamic_shapes=dynamic)
    names = cache_names(layers or len(caches) // 2)
    cache_specs = [_spec(cache, value, cache_dims) for cache, value in zip(names, caches, strict=True)]
    input_specs = [_spec(input_name, value, dims) for input_name, value, dims in inputs] + cache_specs
    cache_outputs = [TensorSpec(f"{spec.name}_out", spec.dtype, spec.shape) for spec in cache_specs]
    output_specs = [*outputs, *cache_outputs]
    in_place = {f"{spec.name}_out": spec.name for spec in cache_specs}
    return StepGraph(name, program, input_specs, output_specs, in_place)


def trace_step(model: CausalLM, max_seq_len: int) -> StepGraph:
    """Export the step function with T dynamic in [1, max_seq_len]."""
    example = example_step_inputs(model, max_seq_len)
    dims = ({1: "T"}, {1: "T"}, {2: "T"}, {0: "T"})
    inputs = [(name, value, dim) for name, value, dim in zip(STEP_INPUTS, example[:4], dims, strict=True)]
    dtype = str(example[4].dtype).removeprefix("torch.")
    outputs = [TensorSpec("logits", dtype, (1, "T", model.config.vocab_size)),
               TensorSpec("next_ids", "int64", (1, "T"))]  # fmt: skip
    return export_with_caches(GraphName.STEP, StepModule(model), inputs, example[4:], outputs, max_seq_len)


def trace_model(model: CausalLM, max_seq_len: int) -> ModelIR:
    """The IR of a model: its traced step graph and its block view."""
    if max_seq_len > model.config.max_position_embeddings:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds the model's context {model.config.max_position_embeddings}"
        )
    graphs = {GraphName.STEP: trace_step(model, max_seq_len)}
    return ModelIR(model.config, model, max_seq_len, graphs, build_block_view(model.config, graphs))
