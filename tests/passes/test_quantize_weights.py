"""QuantizeWeights: marks exactly the graphs of its role that have linear layers, and edits no graph."""

from __future__ import annotations

import pytest
import transformers
from conftest import TINY_LLAMA, ops_by_block, run_pass, write_tiny_model

from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.specs import parse_quantize, parse_self_draft
from skiptree.models.loader import load_model
from skiptree.passes.insert_tree_verify import InsertTreeVerify
from skiptree.passes.quantize_weights import QuantizeWeights, linear_layers
from skiptree.passes.skip_layers import SkipLayers


@pytest.fixture
def graphs_ir(tmp_path):
    """A 2-layer tiny Llama's IR with "step", "self_draft" (exit after layer 1), "verify", "compact"."""
    write_tiny_model(tmp_path, transformers.LlamaConfig(**TINY_LLAMA))
    ir = trace_model(load_model(tmp_path), max_seq_len=16)
    ir = run_pass(SkipLayers(parse_self_draft("self:exit=1")), ir).ir
    return run_pass(InsertTreeVerify(max_tree=8, first_layer=1), ir).ir


def test_structure_marks_exactly_the_graphs_of_its_role(graphs_ir):
    ir = graphs_ir
    assert set(ir.graphs) == {"step", "self_draft", "verify", "compact"} and ir.weight_quantization == {}
    # 7 per layer + the head: step 2 layers, the draft layer 0, verify layer 1, compact none
    assert {g: linear_layers(ir, g) for g in ir.graphs} == {"step": 15, "self_draft": 8, "verify": 8,
                                                            "compact": 0}  # fmt: skip
    ops = {name: ops_by_block(ir, name) for name in ir.graphs}

    target = run_pass(QuantizeWeights.of(parse_quantize("int8"), role="target"), ir)

    assert target.modified and set(ir.weight_quantization) == {"step", "verify"}  # compact has no weights
    assert {g: spec.to_json() for g, spec in ir.weight_quantization.items()} == {
        g: {"bits": 8, "block_size": 32, "head": True, "accuracy_level": 4, "symmetric": True, "grid": False}
        for g in ("step", "verify")
    }

    draft_spec = parse_quantize("int4:block=16,sym=no,head=no,accuracy=0")
    draft = run_pass(QuantizeWeights.of(draft_spec, role="draft"), ir)

    assert draft.modified and set(ir.weight_quantization) == {"step", "verify", "self_draft"}
    assert ir.weight_quantization["self_draft"] == draft_spec
    assert ir.weight_quantization["step"].bits == 8  # the draft's pass leaves the target's marks
    assert {name: ops_by_block(ir, name) for name in ir.graphs} == ops  # no graph edited
    assert [record.name for record in ir.passes_run][-2:] == ["QuantizeWeights", "QuantizeWeights"]


def test_structure_marks_nothing_without_graphs_of_its_role(tmp_path):
    write_tiny_model(tmp_path, transformers.LlamaConfig(**TINY_LLAMA))
    ir = trace_model(load_model(tmp_path), max_seq_len=16)
    assert not run_pass(QuantizeWeights(bits=4, role="draft"), ir).modified
    assert ir.weight_quantization == {}
    with pytest.raises(ValueError, match="role 'verify' is not one of"):
        QuantizeWeights(bits=4, role="verify").run(ir)
