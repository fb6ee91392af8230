"""InsertTreeVerify: the in-graph ancestor closure, and tree logits equal to per-path decoding."""

from __future__ import annotations

import torch
import transformers
from conftest import TINY_LLAMA, count_calls, ops_by_block, ops_by_layer, run_pass, write_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from skiptree.compiler.ir.graph import verify_ir
from skiptree.compiler.ir.trace import trace_model
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.passes.insert_tree_verify import InsertTreeVerify, tree_ancestors


def brute_force_ancestors(parents: list[int]) -> list[list[int]]:
    out = []
    for node in range(len(parents)):
        row, walk = [0] * len(parents), node
        row[walk] = 1
        while walk != 0:
            walk = parents[walk]
            row[walk] = 1
        out.append(row)
    return out


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(*[st.integers(0, max(i - 1, 0)) for i in range(n)])))
def test_ancestor_closure_matches_brute_force(parents):
    parents = [0, *parents[1:]] if parents else [0]
    got = tree_ancestors(torch.tensor(parents), squarings=6)
    assert got.int().tolist() == brute_force_ancestors(parents)


def test_tree_logits_equal_decoding_each_path(tmp_path):
    write_tiny_model(tmp_path, transformers.LlamaConfig(**TINY_LLAMA))
    model = load_model(tmp_path, torch.float64)
    ir = InsertTreeVerify(max_tree=16).run(trace_model(model, max_seq_len=32)).ir
    verify_ir(ir, after_pass="InsertTreeVerify")
    assert set(ir.graphs) == {"step", "verify", "compact"}
    prompt = [5, 9, 13, 2]
    tokens = [40, 11, 12, 13, 14, 15]  # root 40; tree: 1,2 under root; 3 under 1; 4,5 under 3
    parents = [0, 0, 0, 1, 3, 3]
    stepper = ReferenceStepper(model, max_seq_len=32)
    stepper.prefill(prompt)
    caches = (*stepper.k_cache.unbind(0), *stepper.v_cache.unbind(0))
    verify = ir.graphs["verify"].program.module()
    outputs = verify(torch.tensor([tokens]), torch.tensor(parents), torch.tensor([len(prompt)]),
                     *[c.clone() for c in caches])  # fmt: skip
    logits = outputs[1][0]
    for node, path in {0: [40], 1: [40, 11], 3: [40, 11, 13], 5: [40, 11, 13, 15], 2: [40, 12]}.items():
        fresh = ReferenceStepper(model, max_seq_len=32)
        fresh.prefill(prompt)
        expected = fresh.forward(path)[-1]
        torch.testing.assert_close(logits[node], expected, atol=1e-9, rtol=1e-9)
    assert outputs[0].tolist() == logits.argmax(-1).tolist()


def test_structure_adds_verify_and_compact_graphs(tmp_path):
    """InsertTreeVerify adds "verify" (tree inputs; every layer with the step's ops, or layers E..L-1
    with first_layer E) and "compact" (one in-place cache write per cache, no layers); "step" stays."""
    write_tiny_model(tmp_path, transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 4}))
    ir = trace_model(load_model(tmp_path), max_seq_len=16)
    step_ops, step_layers = ops_by_block(ir, "step"), ops_by_layer(ir, "step")
    caches = [f"k{i}" for i in range(4)] + [f"v{i}" for i in range(4)]
    write = torch.ops.aten.index_put_.default

    assert not run_pass(InsertTreeVerify(max_tree=8, plain_decoding=True), ir).modified  # unfused: no graph
    assert set(ir.graphs) == {"step"}
    ir = run_pass(InsertTreeVerify(max_tree=8), ir).ir

    assert set(ir.graphs) == {"step", "verify", "compact"} and ops_by_block(ir, "step") == step_ops
    verify, compact = ir.graphs["verify"], ir.graphs["compact"]
    assert [s.name for s in verify.inputs] == ["tokens", "parents", "prefix_len", *caches]
    assert [s.name for s in verify.outputs][:3] == ["next_ids", "logits", "features"]
    assert ops_by_layer(ir, "verify") == step_layers
    assert count_calls(ir, "verify", torch.ops.aten.linear.default) == 4 * 7 + 1
    assert count_calls(ir, "verify", write) == 8
    assert [s.name for s in compact.inputs] == ["from_slots", "to_slots", *caches]
    assert ops_by_layer(ir, "compact") == {} and count_calls(ir, "compact", write) == 8

    ir = run_pass(InsertTreeVerify(max_tree=8, first_layer=2), ir).ir  # after a self:exit=2 draft

    tail = ["k2", "k3", "v2", "v3"]
    assert [s.name for s in ir.graphs["verify"].inputs] == ["hidden", "parents", "prefix_len", *tail]
    # the first layer a graph runs also owns one symbolic-size product that the later layers reuse
    assert ops_by_layer(ir, "verify") == {2: step_layers[0], 3: step_layers[3]}
    assert "embed" not in ops_by_block(ir, "verify") and count_calls(ir, "verify", write) == 4
    assert [s.name for s in ir.graphs["compact"].inputs][2:] == caches  # compaction moves every layer
