"""ONNX translations of skiptree's fused ops (`skiptree.models.fused_ops`) into ONNX Runtime contrib
operators (com.microsoft): GroupQueryAttention and SkipSimplifiedLayerNormalization.

The dynamo exporter builds nodes through onnxscript, which wants an operator schema; onnx ships
none for ORT's contrib domain, so the one we emit is registered here (inputs, outputs, attributes
as ORT 1.32 documents them: https://onnxruntime.ai/docs/api/contrib-ops). `TRANSLATIONS` goes to
`torch.onnx.export(custom_translation_table=...)`.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Opset

import skiptree.models.fused_ops  # noqa: F401  (registers the torch.ops.skiptree fused ops)
from skiptree.compiler.lower.external_data import SpillFile

CONTRIB_DOMAIN = "com.microsoft"
GROUP_QUERY_INPUTS = (
    ("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"),
    ("seqlens_k", "M"), ("total_sequence_length", "M"), ("cos_cache", "T"), ("sin_cache", "T"),
    ("position_ids", "P"), ("attention_bias", "T"),
)  # fmt: skip


def _register_group_query_attention() -> None:
    if onnx.defs.has("GroupQueryAttention", CONTRIB_DOMAIN):
        return
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "GroupQueryAttention", CONTRIB_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(name, kind, param_option=optional)
                for name, kind in GROUP_QUERY_INPUTS],
        outputs=[OpSchema.FormalParameter(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations and caches"),
                          ("M", ["tensor(int32)"], "sequence lengths"),
                          ("P", ["tensor(int64)"], "positions")],
        attributes=[OpSchema.Attribute(name, OpSchema.AttrType.INT, "")
                    for name in ("num_heads", "kv_num_heads", "do_rotary")],
    )  # fmt: skip
    onnx.defs.register_schema(schema)


def _register_skip_simplified_layer_normalization() -> None:
    if onnx.defs.has("SkipSimplifiedLayerNormalization", CONTRIB_DOMAIN):
        return
    optional = OpSchema.FormalParameterOption.Optional
    outputs = ("output", "mean", "inv_std_var", "input_skip_bias_sum")
    schema = OpSchema(
        "SkipSimplifiedLayerNormalization", CONTRIB_DOMAIN, 1,
        inputs=[OpSchema.FormalParameter(name, "T", param_option=optional)
                for name in ("input", "skip", "gamma", "bias")],
        outputs=[OpSchema.FormalParameter(name, "T", param_option=optional) for name in outputs],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations")],
        attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "")],
    )  # fmt: skip
    onnx.defs.register_schema(schema)


_register_group_query_attention()
_register_skip_simplified_layer_normalization()
contrib = Opset(CONTRIB_DOMAIN, 1)


def group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                          cos_cache, sin_cache, position_ids, attention_bias,
                          num_heads: int, kv_num_heads: int):  # fmt: skip
    """One GroupQueryAttention node (rotary inside); the bias [B, 1, T, S] is cut to the total slots,
    the width ORT expects of it."""
    total = op.Reshape(op.Cast(total_sequence_length, to=onnx.TensorProto.INT64), op.Constant(value_ints=[1]))
    bias = op.Slice(attention_bias, op.Constant(value_ints=[0]), total, op.Constant(value_ints=[3]))
    return contrib.GroupQueryAttention(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
        position_ids, bias, num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1, _outputs=3,
    )  # fmt: skip


def skip_rms_norm(x, skip, weight, eps: float):
    """One SkipSimplifiedLayerNormalization: (normed, x + skip). Its mean and inverse-deviation
    outputs are unused (`drop_unused_contrib_outputs` unnames them after export)."""
    normed, _, _, total = contrib.SkipSimplifiedLayerNormalization(x, skip, weight, epsilon=eps, _outputs=4)
    return normed, total


def drop_unused_contrib_outputs(model: onnx.ModelProto) -> None:
    """Unname the optional outputs of contrib nodes that nothing reads, so ORT skips computing them."""
    used = {name for node in model.graph.node for name in node.input} | {v.name for v in model.graph.output}
    for node in model.graph.node:
        if node.domain == CONTRIB_DOMAIN and node.op_type == "SkipSimplifiedLayerNormalization":
            for index in (1, 2):
                if index < len(node.output) and node.output[index] not in used:
                    node.output[index] = ""


TRANSLATIONS = {torch.ops.skiptree.group_query_attention.default: group_query_attention,
                torch.ops.skiptree.skip_rms_norm.default: skip_rms_norm}  # fmt: skip


def _projection(name: str, producers: dict, initializers: dict) -> tuple | None:
    """(MatMul node, bias Add node or None) computing `name` = x @ W (+ b) with constant W and b."""
    node, add = producers.get(name), None
    if node is not None and node.op_type == "Add":
        constant = [i for i in node.input if i in initializers]
        other = [i for i in node.input if i not in initializers]
        if len(constant) != 1 or len(other) != 1:
            return None
        add, node = node, producers.get(other[0])
    if node is None or node.op_type != "MatMul" or node.input[1] not in initializers:
        return None
    return node, add


def pack_attention_projections(model: onnx.ModelProto, spill: SpillFile | None = None) -> int:
    """GroupQueryAttention(x @ Wq (+ bq), x @ Wk (+ bk), x @ Wv (+ bv)) -> GroupQueryAttention(
    x @ [Wq Wk Wv] (+ [bq bk bv]), -, -): ORT's packed-QKV form, one matmul instead of three (before
    quantisation, which then sees one constant weight). Returns how many nodes were packed. `spill`:
    where each packed weight goes as soon as it is made (external_data.py), else it stays in memory."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {init.name: init for init in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    packed, removed = 0, set()
    for attention in [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.input[1]]:
        parts = [_projection(name, producers, initializers) for name in attention.input[:3]]
        if any(part is None for part in parts) or len({matmul.input[0] for matmul, _ in parts}) != 1:
            continue
        shared = any(readers[name] != 1 for name in attention.input[:3])
        if shared or len({add is None for _, add in parts}) != 1:
            continue
        prefix = f"{attention.name}_qkv"
        weights = [numpy_helper.to_array(initializers[matmul.input[1]]) for matmul, _ in parts]
        packed_weight = numpy_helper.from_array(np.concatenate(weights, axis=1), f"{prefix}_weight")
        del weights
        if spill is not None:  # before it joins the graph: a cleared field's bytes stay in the graph's arena
            spill.move(packed_weight)
        graph.initializer.append(packed_weight)
        new_nodes = [helper.make_node("MatMul", [parts[0][0].input[0], f"{prefix}_weight"], [f"{prefix}_out"],
                                      name=f"{prefix}_matmul")]  # fmt: skip
        if parts[0][1] is not None:
            biases = [numpy_helper.to_array(initializers[next(i for i in add.input if i in initializers)])
                      for _, add in parts]  # fmt: skip
            graph.initializer.append(numpy_helper.from_array(np.concatenate(biases), f"{prefix}_bias"))
            new_nodes.append(helper.make_node("Add", [f"{prefix}_out", f"{prefix}_bias"], [f"{prefix}_sum"]))
        position = list(graph.node).index(attention)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        attention.input[0], attention.input[1], attention.input[2] = new_nodes[-1].output[0], "", ""
        removed |= {id(node) for part in parts for node in part if node is not None}
        packed += 1
    if removed:
        keep = [node for node in graph.node if id(node) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
        read = {name for node in graph.node for name in node.input}
        for init in [i for i in graph.initializer if i.name not in read]:
            graph.initializer.remove(init)
    return packed
