"""EliminateDeadCode removes unused pure ops and keeps the in-place cache writes."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY_LLAMA, count_calls, ops_by_block, run_pass, write_tiny_model

from skiptree.compiler.ir.graph import IRError, verify_ir
from skiptree.compiler.ir.pass_manager import PassManager
from skiptree.compiler.ir.trace import example_step_inputs, trace_model
from skiptree.models.loader import load_model
from skiptree.passes.eliminate_dead_code import EliminateDeadCode


def test_removes_dead_ops_keeps_cache_writes_and_outputs(tmp_path):
    write_tiny_model(tmp_path, transformers.LlamaConfig(**TINY_LLAMA))
    ir = trace_model(load_model(tmp_path), max_seq_len=16)
    graph = ir.graphs["step"].graph
    logits = next(n for n in graph.nodes if n.op == "output").args[0][0]
    with graph.inserting_after(logits):  # a dead op, as a structural pass would leave behind
        dead = graph.call_function(torch.ops.aten.mul.Tensor, (logits, 2.0))
    dead.meta["block"] = "head"
    ir.blocks.nodes["head"]["ops"].append(f"step:{dead.name}")
    writes_before = [n.name for n in graph.nodes if n.target == torch.ops.aten.index_put_.default]

    result = EliminateDeadCode().run(ir)

    assert result.modified
    verify_ir(result.ir, after_pass="EliminateDeadCode")
    names = {n.name for n in graph.nodes}
    assert dead.name not in names and f"step:{dead.name}" not in ir.blocks.nodes["head"]["ops"]
    assert [n.name for n in graph.nodes if n.target == torch.ops.aten.index_put_.default] == writes_before
    assert len(writes_before) == 4  # k and v of 2 layers
    inputs = example_step_inputs(ir.model, 16)
    out = ir.graphs["step"].program.module()(*inputs)
    assert out[2].abs().sum() > 0  # the cache write still happens
    assert not EliminateDeadCode().run(ir).modified


def test_structure_removes_exactly_the_dead_ops(tmp_path):
    """Three dead ops added (a chain of two after the logits, one inside layer 1's MLP): the pass
    removes exactly those three, from the graph and from the block view, and nothing else."""
    write_tiny_model(tmp_path, transformers.LlamaConfig(**TINY_LLAMA))
    ir = trace_model(load_model(tmp_path), max_seq_len=16)
    traced = ops_by_block(ir, "step")
    graph = ir.graphs["step"].graph
    logits = next(n for n in graph.nodes if n.op == "output").args[0][0]
    with graph.inserting_after(logits):
        first = graph.call_function(torch.ops.aten.mul.Tensor, (logits, 2.0))
    with graph.inserting_after(first):
        second = graph.call_function(torch.ops.aten.add.Tensor, (first, 1.0))  # uses the first
    mlp_op = next(n for n in graph.nodes if n.op == "call_function" and n.meta["block"] == "layers.1.mlp")
    with graph.inserting_after(mlp_op):
        third = graph.call_function(torch.ops.aten.neg.default, (mlp_op,))
    for node, block in ((first, "head"), (second, "head"), (third, "layers.1.mlp")):
        node.meta["block"] = block
        ir.blocks.nodes[block]["ops"].append(f"step:{node.name}")
    expected = {**traced, "head": traced["head"] + 2, "layers.1.mlp": traced["layers.1.mlp"] + 1}
    assert ops_by_block(ir, "step") == expected
    inputs = [n.name for n in graph.nodes if n.op == "placeholder"]

    result = run_pass(EliminateDeadCode(), ir)

    assert result.modified
    assert ops_by_block(result.ir, "step") == traced  # exactly the three dead ops are gone
    assert sum(len(ops) for _, ops in result.ir.blocks.nodes(data="ops")) == sum(traced.values())
    assert count_calls(result.ir, "step", torch.ops.aten.index_put_.default) == 4  # k, v of 2 layers
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == inputs
    assert not run_pass(EliminateDeadCode(), result.ir).modified
    assert ops_by_block(result.ir, "step") == traced


def test_every_pass_manager_verifies_in_tests(tmp_path):
    """tests/conftest.py turns the verifier on for every PassManager, even one built without it."""
    write_tiny_model(tmp_path, transformers.LlamaConfig(**TINY_LLAMA))
    ir = trace_model(load_model(tmp_path), max_seq_len=16)
    ir.blocks.remove_node("norm")  # ops still point to it: verify_ir refuses this IR
    with pytest.raises(IRError, match="after pass trace: op .* has no block"):
        PassManager([EliminateDeadCode()], verify=False, log=lambda message: None).run(ir)
