"""The fused ops: their eager references, ONNX Runtime's GroupQueryAttention and
SkipSimplifiedLayerNormalization through our translations (tree masks, in-place shared caches), and
a fused verify graph against the decomposed one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from conftest import TINY_LLAMA, write_tiny_model

from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.lower.onnx_contrib import TRANSLATIONS, drop_unused_contrib_outputs
from skiptree.models.fused_ops import group_query_attention, rotary_tables, skip_rms_norm
from skiptree.models.llama import RMSNorm
from skiptree.models.loader import load_model
from skiptree.passes.insert_tree_verify import InsertTreeVerify, tree_ancestors

HEADS, KV_HEADS, DIM, SLOTS = 6, 2, 16, 24
TINY_FUSED = dict(TINY_LLAMA, hidden_size=64)  # head size 16: what ORT's kernel accepts


class OneAttention(torch.nn.Module):
    def forward(self, query, key, value, k0, v0, seqlens_k, total, cos, sin, positions, bias):
        inputs = (query, key, value, k0, v0, seqlens_k, total, cos, sin, positions, bias)
        return group_query_attention(*inputs, HEADS, KV_HEADS)


def case(past: int, parents: list[int], seed: int = 0) -> tuple:
    """Inputs of one step: `past` cached tokens, a tree of T = len(parents) nodes (root's parent ignored)."""
    generator = torch.Generator().manual_seed(seed)
    steps = len(parents)
    ancestors = tree_ancestors(torch.tensor(parents), squarings=4)
    positions = past + ancestors.sum(-1).long() - 1
    visible = torch.zeros(steps, SLOTS)
    visible[:, :past] = 1
    visible[:, past : past + steps] = ancestors
    bias = torch.where(visible > 0, 0.0, torch.finfo(torch.float32).min)[None, None]
    caches = torch.zeros(2, 1, KV_HEADS, SLOTS, DIM)
    caches[:, :, :, :past] = torch.randn(2, 1, KV_HEADS, past, DIM, generator=generator)
    cos, sin = rotary_tables(1.0 / (10000 ** (torch.arange(0, DIM, 2).float() / DIM)), SLOTS)
    return (torch.randn(1, steps, HEADS * DIM, generator=generator),
            torch.randn(1, steps, KV_HEADS * DIM, generator=generator),
            torch.randn(1, steps, KV_HEADS * DIM, generator=generator), caches[0].clone(), caches[1].clone(),
            torch.tensor([past + steps - 1], dtype=torch.int32),
            torch.tensor(past + steps, dtype=torch.int32), cos, sin, positions[None], bias)  # fmt: skip


def reference_attention(inputs: tuple, parents: list[int]) -> torch.Tensor:
    """Per node, plain softmax attention over the cached prefix and the node's own root path."""
    query, key, value, past_key, past_value, _, total, cos, sin, positions, _ = inputs
    steps, past = len(parents), int(total) - len(parents)
    out = torch.zeros(steps, HEADS, DIM)
    for node in range(steps):
        path, walk = [node], node
        while walk != 0:
            walk = parents[walk]
            path.append(walk)
        path.sort()

        def rotated(x, heads, index):
            x = x[0, index].view(heads, DIM)
            c, s = cos[positions[0, index]], sin[positions[0, index]]
            return torch.cat((x[:, :8] * c - x[:, 8:] * s, x[:, 8:] * c + x[:, :8] * s), -1)

        new_keys = torch.stack([rotated(key, KV_HEADS, i) for i in path], 1)
        new_values = value[0, path].view(len(path), KV_HEADS, DIM).transpose(0, 1)
        keys = torch.cat([past_key[0, :, :past], new_keys], 1)
        values = torch.cat([past_value[0, :, :past], new_values], 1)
        q = rotated(query, HEADS, node)
        for head in range(HEADS):
            weights = torch.softmax(keys[head // 3] @ q[head] / DIM**0.5, -1)
            out[node, head] = weights @ values[head // 3]
    return out.reshape(1, steps, HEADS * DIM)


CASES = [(5, [0, 0, 0, 1, 2, 2]), (0, [0, 0, 1, 2]), (9, [0]), (3, [0, 0, 1, 1, 0, 4, 5, 6])]


@pytest.mark.parametrize(("past", "parents"), CASES)
def test_eager_op_is_tree_attention(past, parents):
    inputs = case(past, parents)
    out, present_key, _ = group_query_attention(*inputs, HEADS, KV_HEADS)
    torch.testing.assert_close(out, reference_attention(inputs, parents), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(present_key[:, :, :past], inputs[3][:, :, :past])  # the prefix stays


@pytest.fixture(scope="module")
def onnx_attention(tmp_path_factory):
    """OneAttention exported with our translation table (T dynamic), as an ORT session."""
    path = tmp_path_factory.mktemp("gqa") / "attention.onnx"
    tokens = torch.export.Dim("T", min=1, max=16)
    dynamic = ({1: tokens}, {1: tokens}, {1: tokens}, *[None] * 6, {1: tokens}, {2: tokens})
    program = torch.export.export(OneAttention(), case(2, [0, 0, 1]), dynamic_shapes=dynamic)
    names = ["query", "key", "value", "k0", "v0", "seqlens_k", "total", "cos", "sin", "positions", "bias"]
    torch.onnx.export(program, input_names=names, output_names=["out", "k0_out", "v0_out"], dynamo=True,
                      custom_translation_table=TRANSLATIONS).save(str(path))  # fmt: skip
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("past", "parents"), CASES)
def test_onnx_runtime_matches_eager_in_place(onnx_attention, past, parents):
    inputs = case(past, parents, seed=1)
    expected, expected_key, expected_value = group_query_attention(*inputs, HEADS, KV_HEADS)
    arrays = [x.numpy().copy() for x in inputs]
    binding = onnx_attention.io_binding()
    for name, value in zip(["query", "key", "value"], arrays[:3], strict=True):
        binding.bind_cpu_input(name, value)
    rest = ["seqlens_k", "total", "cos", "sin", "positions", "bias"]
    for name, value in zip(rest, arrays[5:], strict=True):
        binding.bind_cpu_input(name, value)
    for name, buffer in (("k0", arrays[3]), ("v0", arrays[4])):  # one buffer in and out, as the runtime binds
        binding.bind_input(name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        binding.bind_output(f"{name}_out", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
    binding.bind_output("out", "cpu")
    onnx_attention.run_with_iobinding(binding)
    out = binding.get_outputs()[-1].numpy()
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)
    total = past + len(parents)
    np.testing.assert_allclose(arrays[3][:, :, :total], expected_key[:, :, :total].numpy(), atol=1e-6)
    np.testing.assert_allclose(arrays[4][:, :, :total], expected_value[:, :, :total].numpy(), atol=1e-6)
    assert not arrays[3][:, :, total:].any()  # slots past the step are not written


def test_fused_verify_graph_equals_decomposed(tmp_path):
    write_tiny_model(tmp_path, transformers.LlamaConfig(**TINY_FUSED))
    model = load_model(tmp_path, torch.float32)
    assert model.supports_fused_attention()
    graphs = {fused: InsertTreeVerify(max_tree=16, fused_attention=fused).run(trace_model(model, 32)).ir
              for fused in (False, True)}  # fmt: skip
    verify_nodes = graphs[True].graphs["verify"].graph.nodes
    fused_ops = [n for n in verify_nodes if "group_query_attention" in str(n.target)]
    assert len(fused_ops) == model.config.num_layers
    inputs = (torch.tensor([[40, 11, 12, 13, 14, 15]]), torch.tensor([0, 0, 0, 1, 3, 3]), torch.tensor([4]))
    caches = [torch.randn(1, 2, 32, 16) for _ in range(4)]
    for cache in caches:
        cache[:, :, 4:] = 0  # four cached tokens
    outputs = {fused: ir.graphs["verify"].program.module()(*inputs, *[c.clone() for c in caches])
               for fused, ir in graphs.items()}  # fmt: skip
    for got, expected in zip(outputs[True], outputs[False], strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_model_that_cannot_fuse_keeps_decomposed_attention(tmp_path):
    write_tiny_model(tmp_path, transformers.LlamaConfig(**TINY_LLAMA))  # head size 8
    model = load_model(tmp_path, torch.float32)
    assert not model.supports_fused_attention()
    ir = InsertTreeVerify(max_tree=8, fused_attention=True).run(trace_model(model, 32)).ir
    assert not any("group_query_attention" in str(n.target) for n in ir.graphs["verify"].graph.nodes)


class OneSkipNorm(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x, skip):
        return skip_rms_norm(x, skip, self.weight, 1e-5)


def test_skip_rms_norm_is_the_residual_add_then_rms_norm(tmp_path):
    generator = torch.Generator().manual_seed(3)
    x, skip = (torch.randn(1, 5, 64, generator=generator) for _ in range(2))
    weight = torch.randn(64, generator=generator)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = weight.clone()
    normed, total = skip_rms_norm(x, skip, weight, 1e-5)
    torch.testing.assert_close(total, x + skip)
    torch.testing.assert_close(normed, norm(x + skip))
    tokens = torch.export.Dim("T", min=1, max=16)
    program = torch.export.export(OneSkipNorm(weight), (x, skip), dynamic_shapes=({1: tokens}, {1: tokens}))
    path = tmp_path / "norm.onnx"
    onnx_program = torch.onnx.export(program, input_names=["x", "skip"], output_names=["normed", "total"],
                                     dynamo=True, custom_translation_table=TRANSLATIONS)  # fmt: skip
    onnx_program.save(str(path))
    model = onnx.load(str(path))
    drop_unused_contrib_outputs(model)
    [node] = [n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert list(node.output)[1:3] == ["", ""]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got_normed, got_total = session.run(None, {"x": x.numpy(), "skip": skip.numpy()})
    np.testing.assert_allclose(got_normed, normed.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_total, total.numpy(), atol=1e-6)
