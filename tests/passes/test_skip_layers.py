"""SkipLayers self-drafts: lossless (greedy == the target's own greedy), prefix exits reuse the
target's K/V, layer specs parse and refuse clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import (
    TINY_LLAMA,
    count_calls,
    ops_by_block,
    ops_by_layer,
    run_pass,
    write_tiny_model,
    write_word_tokenizer,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.options import CompileOptionError
from skiptree.compiler.specs import SelfDraftError, format_layers, parse_self_draft
from skiptree.models.loader import load_model
from skiptree.models.reference import ReferenceStepper
from skiptree.passes.skip_layers import SkipLayers
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.self_draft import SelfDrafter, SplitStepModel
from skiptree.runtime.tree import chain

FOUR_LAYERS = {**TINY_LLAMA, "num_hidden_layers": 4}
# (model seed, self-draft): random tiny models, a prefix exit and skip sets of layers and ranges
CASES = [(0, "self:exit=2"), (1, "self:skip=1-2"), (2, "self:exit=1"), (3, "self:skip=0,3")]
SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


def test_parse_and_format():
    assert parse_self_draft("self:exit=8").exit_layer == 8
    spec = parse_self_draft("self:skip=4-9,15")
    assert spec.skipped == (4, 5, 6, 7, 8, 9, 15)
    assert str(spec) == "self:skip=4-9,15" and format_layers((1, 2, 5)) == "1-2,5"
    assert spec.kept(17) == [0, 1, 2, 3, 10, 11, 12, 13, 14, 16]
    with pytest.raises(SelfDraftError, match="cannot read the self-draft 'self:skip=a-b'.*inclusive"):
        parse_self_draft("self:skip=a-b")
    with pytest.raises(SelfDraftError, match="self:exit=30 is outside 1..29"):
        parse_self_draft("self:exit=30").check(30)
    with pytest.raises(SelfDraftError, match="skip some, not all"):
        parse_self_draft("self:skip=0-3").check(4)


@pytest.fixture(scope="module")
def self_artifacts(tmp_path_factory):
    """Per case: (the float64 eager reference, the compiled self-draft artifact)."""
    built = {}
    for seed, draft in CASES:
        root = tmp_path_factory.mktemp(f"self{seed}")
        write_tiny_model(root / "model", transformers.LlamaConfig(**FOUR_LAYERS), seed=seed)
        write_word_tokenizer(root / "model")
        art = skiptree.compile(root / "model", root / "art", max_seq_len=48, draft=draft, tree="chain:3",
                               dtype="float64", max_tree=16)  # fmt: skip
        built[draft] = (load_model(root / "model", torch.float64), skiptree.load(art))
    return built


@SETTINGS
@given(case=st.sampled_from(CASES), depth=st.integers(1, 6), prompt=st.lists(st.integers(0, 96), min_size=1,
       max_size=10), new=st.integers(1, 24))  # fmt: skip
def test_self_draft_greedy_equals_autoregressive(self_artifacts, case, depth, prompt, new):
    model, runtime = self_artifacts[case[1]]
    expected = generate_tokens(ReferenceStepper(model, max_seq_len=48), prompt, new).token_ids
    got = runtime.speculative.with_tree(chain(depth)).generate(prompt, new).token_ids
    assert got == expected


def test_self_draft_plain_steps_equal_reference(self_artifacts):
    """speculative=False: a prefix-exit artifact's plain step is its two halves in a row."""
    model, runtime = self_artifacts["self:exit=2"]
    plain = skiptree.load(runtime.folder, speculative=False)
    assert isinstance(plain.step_model, SplitStepModel)
    prompt = [5, 17, 3, 3, 8]
    expected = ReferenceStepper(model, max_seq_len=48).prefill(prompt)
    np.testing.assert_allclose(plain.step_model.prefill(prompt), expected, atol=1e-5)  # float32 norms


class CountingGraph:
    """Wraps a real OnnxGraph; counts layer-token computations (layers it runs x tokens it gets)."""

    def __init__(self, graph, count):
        self.graph, self.count = graph, count
        self.layers = sum(1 for name in graph.session_inputs if name[0] == "k" and name[1:].isdigit())

    def __getattr__(self, name):
        return getattr(self.graph, name)

    def run(self, inputs, outputs):
        tokens = inputs["input_ids"] if "input_ids" in inputs else inputs["hidden"]
        self.count.append(self.layers * tokens.shape[1])
        return self.graph.run(inputs, outputs)


def test_prefix_exit_reuses_target_kv(self_artifacts):
    """Per speculative step with a chain of k drafts, layers < E run once per token (k + 1 draft
    passes), layers >= E once per token in verification: (k + 1) * L layer computations in all."""
    _, runtime = self_artifacts["self:exit=2"]
    verify = runtime.speculative.verify_graph
    assert [n for n in verify.session_inputs if n.startswith("k")] == ["k2", "k3"]
    counts: list[int] = []
    k = 3
    drafter = SelfDrafter(CountingGraph(runtime.speculative.drafter.graph, counts), exit_kind=True)
    decoder = runtime.speculative.with_tree(chain(k), drafter)
    decoder.verify_graph = CountingGraph(verify, counts)
    decoder.step.prefill([4, 9, 4, 9])
    before = decoder.step.cache.length
    _, record = decoder._one_step([4, 9, 4, 9, 4], SamplingConfig(), None)
    assert record.drafted == k and decoder.step.cache.length == before + 1 + record.accepted
    assert sum(counts) == (k + 1) * 4  # 4 layers; without reuse: k * 2 + (k + 1) * 4


def test_self_draft_needs_a_chain(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    with pytest.raises(CompileOptionError, match="self-drafts draft chains.*chain:K"):
        skiptree.compile(folder, tmp_path / "art", draft="self:exit=1", tree="k-ary:2x2")
    with pytest.raises(CompileOptionError, match="self:auto is a search.*skiptree tune"):
        skiptree.compile(folder, tmp_path / "art", draft="self:auto")


@pytest.mark.parametrize(("draft", "kept"), [("self:skip=1-2", [0, 3]), ("self:exit=3", [0, 1, 2])])
def test_structure_self_draft_runs_exactly_the_kept_layers(tmp_path, draft, kept):
    """SkipLayers adds "self_draft": each kept layer has the step graph's ops, skipped ones none;
    7 linears per kept layer + the head; the caches and cache writes of the kept layers only."""
    write_tiny_model(tmp_path, transformers.LlamaConfig(**FOUR_LAYERS))
    ir = trace_model(load_model(tmp_path), max_seq_len=16)
    step_ops, step_layers = ops_by_block(ir, "step"), ops_by_layer(ir, "step")

    result = run_pass(SkipLayers(parse_self_draft(draft)), ir)

    assert result.modified and set(result.ir.graphs) == {"step", "self_draft"}
    assert ops_by_block(result.ir, "step") == step_ops  # the target's step is untouched
    assert ops_by_layer(result.ir, "self_draft") == {layer: step_layers[layer] for layer in kept}
    assert count_calls(result.ir, "self_draft", torch.ops.aten.linear.default) == 7 * len(kept) + 1
    assert count_calls(result.ir, "self_draft", torch.ops.aten.index_put_.default) == 2 * len(kept)
    graph = result.ir.graphs["self_draft"]
    caches = [f"k{i}" for i in kept] + [f"v{i}" for i in kept]
    assert [s.name for s in graph.inputs] == ["input_ids", "positions", "attn_bias", "write_slots", *caches]
    assert [s.name for s in graph.outputs] == ["logits", "next_ids", "hidden"] + [f"{c}_out" for c in caches]
