"""Weight-only quantisation of ONNX step graphs: every constant-weight MatMul -> `MatMulNBits`.

ONNX Runtime's own tooling does the work (`MatMulNBitsQuantizer`: round-to-nearest, block-wise
along the input dim, a float scale and (asymmetric, `sym=no`) an integer zero point per block). What we add:
- the option string (`--quantize int8|int4[:block=32][,sym=no][,grid=yes][,head=no][,accuracy=0]`)
  as a typed spec; symmetric by default (no zero points: MLAS's faster kernel);
- the tied output head: exported as `MatMul(x, Transpose(embedding))`, which the quantizer skips
  (its weight is not a constant); with `head=yes` (default) the transpose is folded into a stored
  weight first, so the head (49152 x 576 in SmolLM2: a fifth of the model) is quantised too;
- `accuracy=4` (default) lets MatMulNBits quantise activations to int8 per block and use integer
  dot products (fastest on CPU); `accuracy=0` computes in float32 on the dequantised weights.
With `grid=yes`, a GGUF source's Q4_0 / Q4_1 / Q8_0 matrices keep their own grid
(`quantize_grid.py`) whatever the bits asked, with block 32 (ggml's; another block re-quantises
everything). The default re-quantises the dequantised weights: faster, further from the source
(both measured in bench/results/quantized_formats_1t.md; compile prints the perplexity).
A quantised artifact is a different model from the float one: speculative decoding is lossless
with respect to it (its verify graph is the quantised target), and `compile --check` reports its
logit error against the float model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from skiptree.compiler.lower.external_data import SpillFile, save_streaming
from skiptree.compiler.lower.quantize_grid import apply_grid
from skiptree.compiler.specs import WeightQuantization
from skiptree.models.gguf_grid import BLOCK

CHUNK_BYTES = 512 << 20  # float weights quantised per ORT quantizer run


def fold_transposed_weights(model: onnx.ModelProto, spill: SpillFile | None = None) -> int:
    """`MatMul(x, Transpose(W))` with W an initializer -> `MatMul(x, W_t)`, W_t stored transposed
    (in `spill` when given). Returns how many were folded (the tied head; W stays for the embedding)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producers:
            continue
        transpose = producers[node.input[1]]
        if transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if perm not in (None, [1, 0]) or consumers[node.input[1]] != 1:
            continue
        weight = numpy_helper.to_array(initializers[transpose.input[0]], base_dir="")
        name = f"{transpose.input[0]}_transposed"
        stored = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
        del weight
        if spill is not None:  # before it joins the graph: a cleared field's bytes stay in the graph's arena
            spill.move(stored)
        graph.initializer.append(stored)
        node.input[1] = stored.name
        folded.append(transpose)
    for transpose in folded:  # (not while iterating over the nodes)
        graph.node.remove(transpose)
    return len(folded)


def head_matmuls(model: onnx.ModelProto, vocab_size: int) -> list[str]:
    """MatMul nodes with a constant [hidden, vocab_size] weight: the output head."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and shapes.get(node.input[1], (0, 0))[-1:] == (vocab_size,)]


def quantize_onnx_file(path: Path, spec: WeightQuantization, vocab_size: int,
                       grid: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Quantise one exported graph in place (`path` + its external data); returns what was done.
    `grid`: a GGUF source's Q4_0 / Q4_1 / Q8_0 matrices (`read_grid`), lowered on their own grid
    when the block size is ggml's 32 (`compiler/lower/quantize_grid.py`); the rest is quantised here."""
    path = Path(path).resolve()  # the rewrite runs in its folder
    model = onnx.load(str(path), load_external_data=False)  # each weight is read when quantised
    with contextlib.chdir(path.parent), SpillFile(Path(f"{path.name}.spill")) as spill:
        # external references resolve here (external_data.py); new tensors go to the spill file
        quantized, done = _quantize_model(model, spec, vocab_size, grid, spill)
        save_streaming(quantized, path)
    return done


def _weight_chunks(model: onnx.ModelProto, exclude: set[str]) -> list[set[str]]:
    """The graph's MatMul nodes (not in `exclude`) in groups of about CHUNK_BYTES of float weights:
    one ORT quantizer run each (see `_quantize_model`)."""
    sizes = {init.name: 4 * int(np.prod(init.dims)) for init in model.graph.initializer}
    chunks, current, total = [], set(), 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name not in exclude and node.input[1] in sizes:
            current.add(node.name)
            total += sizes[node.input[1]]
            if total >= CHUNK_BYTES:
                chunks.append(current)
                current, total = set(), 0
    return [*chunks, current] if current or not chunks else chunks


def _spilling(quantize: Callable, spill: SpillFile) -> Callable:
    """A node quantizer whose new tensors go to `spill` as soon as each node is done (ORT's quantizer
    would hold every node's codes until the end)."""

    def quantize_and_spill(node: onnx.NodeProto, graph_stack: list[onnx.GraphProto]) -> list[onnx.NodeProto]:
        counts = [len(graph.initializer) for graph in graph_stack]
        nodes = quantize(node, graph_stack)
        for graph, count in zip(graph_stack, counts, strict=False):
            spill.move_new(graph, count)
        return nodes

    return quantize_and_spill


def _quantize_model(model: onnx.ModelProto, spec: WeightQuantization, vocab_size: int,
                    grid: dict[str, Any] | None, spill: SpillFile
                    ) -> tuple[onnx.ModelProto, dict[str, Any]]:  # fmt: skip
    before = sum(1 for node in model.graph.node if node.op_type == "MatMul")
    folded = fold_transposed_weights(model, spill) if spec.head else 0
    kept = [] if spec.head else head_matmuls(model, vocab_size)
    on_grid, added = {}, []
    if grid and spec.grid and spec.block_size == BLOCK:  # ggml's block: only then is it the one asked
        on_grid, added = apply_grid(model, grid, spec.accuracy_level, set(kept), spec.symmetric)
    logger = logging.getLogger("onnxruntime.quantization")
    level, logger.level = logger.level, logging.WARNING  # one INFO line per node otherwise
    matmuls = {node.name for node in model.graph.node if node.op_type == "MatMul"}
    try:
        for chunk in _weight_chunks(model, set(kept + added)):
            others = sorted(matmuls - chunk)
            quantizer = MatMulNBitsQuantizer(model, bits=spec.bits, block_size=spec.block_size,
                                             is_symmetric=spec.symmetric, accuracy_level=spec.accuracy_level,
                                             nodes_to_exclude=kept + added + others)  # fmt: skip
            quantizer.node_quantizer.quantize = _spilling(quantizer.node_quantizer.quantize, spill)
            quantizer.process()
            # A fresh message: the spilled codes' bytes, set then cleared, stay in the old one's arena.
            model = onnx.ModelProto.FromString(quantizer.model.model.SerializeToString())
    finally:
        logger.level = level
    quantized = model
    kinds = [node.op_type for node in quantized.graph.node]
    return quantized, {**spec.to_json(), "quantized_matmuls": kinds.count("MatMulNBits"),
            "float_matmuls": kinds.count("MatMul"), "matmuls_before": before,
            "head_folded": folded, "gguf_grid": on_grid}  # fmt: skip
