"""Lower GGUF-quantised weights to MatMulNBits on their own grid (no re-quantisation).

A MatMul whose constant weight is, bit for bit, the float32 dequantisation of a GGUF Q4_0, Q4_1 or
Q8_0 matrix (`skiptree.models.gguf_grid`; found by content, so any export naming or folding works)
becomes MatMulNBits with the matrix's own codes and scales (block 32, as ggml's):

    Q4_0  bits 4, codes as stored, scale d, zero point absent (= 8)        w = d (q - 8)
    Q8_0  bits 8, codes q + 128, scale d, zero point absent (= 128)        w = d q
    Q4_1  bits 4, scale d, zero point 0 -> d q exactly; the block minimum m is added apart:
          y = MatMulNBits(x) + (x summed per 32-block) @ m^T               w = d q + m

With int8 activations and `symmetric` (the default), Q4_1 codes go to MLAS's faster symmetric kernel
instead (zero point absent = 8) and the minimum term carries the difference: w = d (q - 8) + (m + 8 d),
exact up to the float rounding of m + 8 d, far below what int8 activations round.
Q4_1 as a float zero point (-m / d) would round (about 10% of SmolLM2's blocks) and takes ORT's
slow dequantise-every-call path; the separate minimum term is exact and costs one small MatMul.
ggml packs element i and i + 16 into byte i; MatMulNBits wants elements 2j, 2j + 1 in byte j.
With float activations (accuracy_level 0) Q8_0 matrices stay float MatMuls: their float32 weights
are exactly the grid's values, and ORT's CPU MatMulNBits has no float-compute 8-bit kernel (it
dequantises on every call: 2.6-3.0 ms against 38-40 us with int8 compute for a 1536 x 576 matmul).
A fused graph's packed q|k|v matmul (`skiptree.compiler.lower.onnx_contrib`) is matched against the row
concatenation of the three grid tensors of one kind (`packed_siblings`), so it stays on the grid.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from skiptree.models.gguf_grid import BLOCK, GridTensor

SUBGRAPHS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


PACKED = (("q_proj", "k_proj", "v_proj"),)  # projections a fused graph packs into one matmul (onnx_contrib)


def packed_siblings(grid: dict[str, GridTensor]) -> list[GridTensor]:
    """The row concatenations of sibling projections (q | k | v of a layer) of one kind: a packed
    matmul's weight is exactly their dequantisation, so it keeps the grid too."""
    packed = []
    for name in grid:
        for group in PACKED:
            if group[0] not in name:
                continue
            parts = [grid.get(name.replace(group[0], member)) for member in group]
            if all(parts) and len({(part.kind, part.blocks.shape[1]) for part in parts}) == 1:
                packed.append(GridTensor(parts[0].kind, np.concatenate([part.blocks for part in parts])))
    return packed


def _digest(weight: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(weight, dtype=np.float32).tobytes()).digest()


def nbits_initializers(tensor: GridTensor, prefix: str, symmetric: bool = False) -> list[onnx.TensorProto]:
    """B (packed codes), scales and, for Q4_1 unless `symmetric`, zero points (all 0), as
    MatMulNBits wants them."""
    codes = tensor.codes()  # [N, K / 32, 32]
    packed = codes if tensor.bits == 8 else codes[..., 0::2] | (codes[..., 1::2] << 4)
    arrays = {"codes": np.ascontiguousarray(packed, dtype=np.uint8), "scales": tensor.scales.reshape(-1)}
    if tensor.kind == "Q4_1" and not symmetric:
        rows, blocks = tensor.scales.shape
        arrays["zero_points"] = np.zeros((rows, (blocks + 1) // 2), dtype=np.uint8)
    return [numpy_helper.from_array(array, f"{prefix}_{name}") for name, array in arrays.items()]


def grid_nodes(node: onnx.NodeProto, tensor: GridTensor, accuracy_level: int, symmetric: bool = False
               ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:  # fmt: skip
    """The nodes (and initializers) that replace MatMul `node` over `tensor`'s grid (`symmetric`:
    Q4_1 on the kernel without zero points, its minimums shifted by 8 d)."""
    prefix = f"{node.name or node.output[0]}_gguf"
    rows, blocks = tensor.scales.shape
    initializers = nbits_initializers(tensor, prefix, symmetric)
    codes_out = f"{prefix}_codes_out" if tensor.kind == "Q4_1" else node.output[0]
    nodes = [helper.make_node("MatMulNBits", [node.input[0], *(i.name for i in initializers)], [codes_out],
                              name=f"{prefix}_nbits", domain="com.microsoft", K=blocks * BLOCK, N=rows,
                              bits=tensor.bits, block_size=BLOCK, accuracy_level=accuracy_level)]  # fmt: skip
    if tensor.kind == "Q4_1":  # + (x summed per block) @ m^T: the inputs are [B, T, K]
        minimums = tensor.minimums + 8 * tensor.scales if symmetric else tensor.minimums
        constants = {"shape": np.array([0, 0, blocks, BLOCK], np.int64), "axes": np.array([-1], np.int64),
                     "minimums": np.ascontiguousarray(minimums.T, dtype=np.float32)}  # fmt: skip
        initializers += [numpy_helper.from_array(array, f"{prefix}_{k}") for k, array in constants.items()]
        nodes += [helper.make_node("Reshape", [node.input[0], f"{prefix}_shape"], [f"{prefix}_blocks"]),
                  helper.make_node("ReduceSum", [f"{prefix}_blocks", f"{prefix}_axes"], [f"{prefix}_sums"],
                                   keepdims=0),
                  helper.make_node("MatMul", [f"{prefix}_sums", f"{prefix}_minimums"], [f"{prefix}_min_out"],
                                   name=f"{prefix}_minimum_matmul"),
                  helper.make_node("Add", [codes_out, f"{prefix}_min_out"], [node.output[0]])]  # fmt: skip
    return nodes, initializers


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name read by a node of `graph` or of its subgraphs (`If` branches read outer names)."""
    names = {output.name for output in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.type in SUBGRAPHS else ():
                names |= names_read(subgraph)
    return names


def apply_grid(model: onnx.ModelProto, grid: dict[str, GridTensor], accuracy_level: int,
               skip: set[str] = frozenset(), symmetric: bool = False
               ) -> tuple[dict[str, int], list[str]]:  # fmt: skip
    """Rewrite every MatMul over a grid weight (except nodes named in `skip`; `symmetric`: Q4_1 on
    the symmetric kernel, int8 activations only). Returns the count per kind and the names of the
    float MatMuls added (the generic quantiser must leave them alone)."""
    candidates = [*grid.values(), *packed_siblings(grid)]
    by_digest = {_digest(tensor.dequantized().T): tensor for tensor in candidates}
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    counts: dict[str, int] = {}
    added: list[str] = []
    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        matmul = node.op_type == "MatMul" and len(node.input) == 2
        weight = initializers.get(node.input[1]) if matmul else None
        tensor = None
        if weight is not None and node.name not in skip and len(weight.dims) == 2:
            array = numpy_helper.to_array(weight)
            tensor = by_digest.get(_digest(array)) if array.dtype == np.float32 else None
        if tensor is None:
            rewritten.append(node)
            continue
        if tensor.bits == 8 and accuracy_level == 0:  # no float-compute 8-bit kernel (see the module doc):
            rewritten.append(node)  # the float weight holds the grid's values exactly
            added.append(node.name)
            counts["Q8_0 as float"] = counts.get("Q8_0 as float", 0) + 1
            continue
        shifted = symmetric and accuracy_level == 4 and tensor.kind == "Q4_1"
        nodes, new_initializers = grid_nodes(node, tensor, accuracy_level, shifted)
        rewritten += nodes
        graph.initializer.extend(new_initializers)
        added += [n.name for n in nodes if n.op_type == "MatMul"]
        counts[tensor.kind] = counts.get(tensor.kind, 0) + 1
    if counts:
        del graph.node[:]
        graph.node.extend(rewritten)
        used = names_read(graph)
        unused = [init for init in graph.initializer if init.name not in used]
        for init in unused:
            graph.initializer.remove(init)
        if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts, added
