"""InsertFeatureHead: adds exactly the "feature_draft" graph (the head's one layer, none of the
target's), built from the weights file the training code writes, and leaves the other graphs alone."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY_LLAMA, count_calls, ops_by_block, ops_by_layer, run_pass, write_tiny_model

from skiptree.compiler.ir.trace import trace_model
from skiptree.models.exit_adapter import save_trained
from skiptree.models.feature_head import KIND, FeatureHead
from skiptree.models.loader import load_model
from skiptree.passes.insert_feature_head import InsertFeatureHead

INNER = 16  # the head's MLP width (the target's is 64): the pass must take it from the weights


def head_linears(ir) -> dict[str, int]:
    """Output width of each matrix product in "feature_draft", by the module that makes it."""
    widths = {}
    for node in ir.graphs["feature_draft"].graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.linear.default:
            module = list(node.meta["nn_module_stack"].values())[-1][0]
            widths[module.removeprefix("L['self'].").removeprefix("model.")] = int(node.meta["val"].shape[-1])
    return widths


@pytest.mark.parametrize("vocab", [(), (5, 17, 40)])
def test_structure_adds_the_feature_draft_graph(tmp_path, vocab):
    write_tiny_model(tmp_path / "model", transformers.LlamaConfig(**TINY_LLAMA))
    model = load_model(tmp_path / "model")
    torch.manual_seed(0)  # an untrained head, saved the way training checkpoints it
    save_trained(FeatureHead(model.config, INNER), tmp_path / "head.safetensors", {"kind": KIND, "step": 0})
    ir = trace_model(model, max_seq_len=16)
    step_ops = ops_by_block(ir, "step")

    result = run_pass(InsertFeatureHead(str(tmp_path / "head.safetensors"), vocab), ir)

    assert result.modified and set(result.ir.graphs) == {"step", "feature_draft"}
    assert ops_by_block(result.ir, "step") == step_ops
    graph = result.ir.graphs["feature_draft"]
    names = ["features", "input_ids", "positions", "attn_bias", "write_slots", "k0", "v0"]
    assert [s.name for s in graph.inputs] == names
    assert [s.name for s in graph.outputs] == ["logits", "next_ids", "next_features", "k0_out", "v0_out"]
    step_k0 = next(s for s in ir.graphs["step"].inputs if s.name == "k0")
    assert graph.inputs[-2].shape == graph.inputs[-1].shape == step_k0.shape  # one target layer's cache
    assert ops_by_layer(result.ir, "feature_draft") == {}  # none of the target's layers runs
    assert count_calls(result.ir, "feature_draft", torch.ops.aten.index_put_.default) == 2  # its k0, v0
    layer = "feature_head.layer"  # one Llama layer: hidden 32, K/V 2 heads x 8, MLP INNER
    head = "small_head.rows" if vocab else "head"  # the target's head, or its kept rows
    assert head_linears(result.ir) == {
        "feature_head.fc": 32, f"{layer}.attn.q": 32, f"{layer}.attn.k": 16, f"{layer}.attn.v": 16,
        f"{layer}.attn.o": 32, f"{layer}.mlp.gate": INNER, f"{layer}.mlp.up": INNER, f"{layer}.mlp.down": 32,
        head: len(vocab) or 97,
    }  # fmt: skip
