"""InsertFeatureHead: adds exactly the "feature_draft" graph (the head's one layer, none of the
target's), built from the weights file the training code writes, and leaves the other graphs alone;
the verify graph InsertTreeVerify adds after it returns the head's input features (EAGLE-3: fused)."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY_LLAMA, count_calls, ops_by_block, ops_by_layer, run_pass, write_tiny_model

from skiptree.compiler.drafters.self_draft_search import run_layers
from skiptree.compiler.ir.trace import trace_model
from skiptree.models.exit_adapter import save_trained
from skiptree.models.feature_head import KIND, FeatureHead
from skiptree.models.loader import load_model
from skiptree.passes.insert_feature_head import InsertFeatureHead
from skiptree.passes.insert_tree_verify import InsertTreeVerify

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


FUSABLE = {**TINY_LLAMA, "hidden_size": 64, "num_hidden_layers": 4}  # head size 16: ORT's fused attention


@pytest.mark.parametrize("fused_attention", [False, True])
@pytest.mark.parametrize("eagle3", [True, False])
def test_verify_features_are_the_heads_input(tmp_path, fused_attention, eagle3):
    """With the head on the IR, "verify" returns an EAGLE-3 head's fused streams (an EAGLE-1 head's:
    the last layer's) as `features`, one product more, and the same logits and ids as without it."""
    write_tiny_model(tmp_path / "model", transformers.LlamaConfig(**FUSABLE))
    model = load_model(tmp_path / "model")
    torch.manual_seed(0)
    head = FeatureHead(model.config, INNER, None if eagle3 else ())
    save_trained(head, tmp_path / "head.safetensors", {"kind": KIND, "step": 0})
    assert head.layers == ((1, 2, 4) if eagle3 else (4,))  # low, middle, high (the last layer's output)
    verify = InsertTreeVerify(max_tree=8, fused_attention=fused_attention)
    plain = run_pass(verify, trace_model(model, max_seq_len=16)).ir
    ir = trace_model(model, max_seq_len=16)
    ir = run_pass(verify, run_pass(InsertFeatureHead(str(tmp_path / "head.safetensors")), ir).ir).ir

    linear = torch.ops.aten.linear.default
    assert count_calls(ir, "verify", linear) == count_calls(plain, "verify", linear) + eagle3
    tokens = [5, 9, 13, 2, 40, 11]  # a chain from an empty cache: the eager model's causal pass
    caches = [torch.zeros(1, 2, 16, 16) for _ in range(8)]
    inputs = (torch.tensor([tokens]), torch.tensor([0, 0, 1, 2, 3, 4]), torch.tensor([0]))
    got = ir.graphs["verify"].program.module()(*inputs, *[c.clone() for c in caches])
    expected = plain.graphs["verify"].program.module()(*inputs, *[c.clone() for c in caches])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # verification untouched
    with torch.no_grad():
        states = run_layers(model, tokens, range(4))
        fused = head.fuse_streams(torch.cat([states[i] for i in head.layers], dim=-1))
    scale = float(fused.abs().max())
    torch.testing.assert_close(got[2][0], fused, atol=1e-5 * scale, rtol=1e-5)
