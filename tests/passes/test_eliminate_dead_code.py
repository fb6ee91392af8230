"""EliminateDeadCode removes unused pure ops and keeps the in-place cache writes."""

from __future__ import annotations

import torch
import transformers
from conftest import TINY_LLAMA, write_tiny_model

from skiptree.compiler.ir.graph import verify_ir
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
