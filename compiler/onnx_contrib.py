"""ONNX translations of skiptree's fused ops into ONNX Runtime contrib operators (com.microsoft).

The dynamo exporter builds nodes through onnxscript, which wants an operator schema; onnx ships
none for ORT's contrib domain, so the one we emit is registered here (inputs, outputs, attributes
as ORT 1.32 documents them: https://onnxruntime.ai/docs/api/contrib-ops). `TRANSLATIONS` goes to
`torch.onnx.export(custom_translation_table=...)`.
"""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema
from onnxscript import opset18 as op
from onnxscript.values import Opset

import skiptree.models.fused_attention  # noqa: F401  (registers torch.ops.skiptree.group_query_attention)

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


_register_group_query_attention()
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


TRANSLATIONS = {torch.ops.skiptree.group_query_attention.default: group_query_attention}
