"""Tracing into the IR: the block view, the step signature, the verifier, the IR dump."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import write_tiny_model

from skiptree.compiler.ir.dump import dump_ir
from skiptree.compiler.ir.graph import IRError, verify_ir
from skiptree.compiler.ir.trace import cache_names, example_step_inputs, trace_model
from skiptree.models.loader import load_model


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    write_tiny_model(folder, transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4,
                                                     n_positions=64))  # fmt: skip
    return trace_model(load_model(folder), max_seq_len=24)


def test_block_view_follows_the_residual_stream(tiny_ir):
    verify_ir(tiny_ir)
    flow = [(a, b) for a, b, rel in tiny_ir.blocks.edges(data="relation") if rel == "flow"]
    assert flow == [("embed", "layers.0"), ("layers.0", "layers.1"), ("layers.1", "norm"), ("norm", "head")]
    blocks = tiny_ir.blocks.nodes
    assert blocks["layers.1.attn"]["weights"] == [
        "layers.1.attn_norm.weight", "layers.1.attn_norm.bias", "layers.1.attn.qkv.weight",
        "layers.1.attn.qkv.bias", "layers.1.attn.o.weight", "layers.1.attn.o.bias",
    ]  # fmt: skip
    assert "layers.0.fc.weight" in blocks["layers.0.mlp"]["weights"]
    assert blocks["embed"]["weights"] == ["embed.weight", "position_embed.weight"]
    assert all(blocks[name]["ops"] for name in ("embed", "layers.0.attn", "layers.1.mlp", "norm", "head"))


def test_step_signature(tiny_ir):
    step = tiny_ir.graphs["step"]
    assert [s.name for s in step.inputs] == ["input_ids", "positions", "attn_bias", "write_slots",
                                             *cache_names(2)]  # fmt: skip
    assert step.inputs[2].shape == (1, 1, "T", 24)
    assert step.inputs[4].shape == (1, 4, 24, 8)
    assert [s.name for s in step.outputs][:3] == ["logits", "next_ids", "k0_out"]
    assert step.mutated_inputs["v1_out"] == "v1"


def test_exported_step_equals_eager_for_any_token_count(tiny_ir):
    program = tiny_ir.graphs["step"].program.module()
    for steps in (1, 5):
        inputs = example_step_inputs(tiny_ir.model, 24, steps=max(steps, 2))[:4]
        inputs = tuple(t[..., :steps] if i != 2 else t[..., :steps, :] for i, t in enumerate(inputs))
        caches = example_step_inputs(tiny_ir.model, 24)[4:]
        ids = torch.randint(0, 97, (1, steps))
        args = (ids, *inputs[1:])
        eager = tiny_ir.model(*args[:3], caches[:2], caches[2:], args[3])
        exported = program(*args, *[c.clone() for c in caches])
        torch.testing.assert_close(exported[0], eager)


def test_verifier_names_an_op_without_a_block(tiny_ir):
    node = next(n for n in tiny_ir.graphs["step"].graph.nodes if n.op == "call_function")
    block = node.meta.pop("block")
    try:
        with pytest.raises(IRError, match=rf"after pass Broken: op %{node.name} .* has no block; "
                           r"set node.meta\['block'\]"):  # fmt: skip
            verify_ir(tiny_ir, after_pass="Broken")
    finally:
        node.meta["block"] = block


def test_verifier_rejects_a_broken_residual_flow(tiny_ir):
    tiny_ir.blocks.remove_edge("layers.0", "layers.1")
    try:
        with pytest.raises(IRError, match="the residual flow runs from"):
            verify_ir(tiny_ir)
    finally:
        tiny_ir.blocks.add_edge("layers.0", "layers.1", relation="flow")


def test_dump_writes_text_and_dot(tiny_ir, tmp_path):
    dump_ir(tiny_ir, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.dot", "blocks.txt", "step.dot", "step.txt"]
    text = (tmp_path / "step.txt").read_text()
    assert "aten.index_put_.default" in text and "# block=layers.1.attn" in text
    assert (tmp_path / "blocks.dot").read_text().startswith("digraph blocks {")
