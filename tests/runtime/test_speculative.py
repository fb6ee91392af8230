"""Speculative decoding on ORT artifacts is lossless: greedy output == autoregressive greedy output,
for random tiny target/draft pairs, random trees of 1..32 nodes and random prompts."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from conftest import TINY_LLAMA, random_trees, write_tiny_model, write_word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.runtime.drafters import PromptLookupDrafter
from skiptree.runtime.manifest import DecodeMode, GraphName
from skiptree.runtime.speculative import SpeculativeDecoder
from skiptree.runtime.tree import TreeShape, chain, k_ary

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


@pytest.fixture(scope="module")
def pair_artifact(tmp_path_factory):
    """A float64 tiny target with a tiny draft model (other weights, same tokenizer), tree k-ary:2x2."""
    root = tmp_path_factory.mktemp("spec")
    for name, seed in (("target", 0), ("draft", 5)):
        write_tiny_model(root / name, transformers.LlamaConfig(**TINY_LLAMA), seed=seed)
        write_word_tokenizer(root / name)
    art = skiptree.compile(root / "target", root / "artifact", max_seq_len=64, draft=str(root / "draft"),
                           tree="k-ary:2x2", dtype="float64", max_tree=40)  # fmt: skip
    return skiptree.load(art), skiptree.load(art, speculative=False)


def prompts():
    """Random prompts, half of them repetitive so that prompt lookup finds matches."""
    words = st.lists(st.integers(0, 96), min_size=1, max_size=8)
    return st.one_of(words, words.map(lambda w: w * 4))


def with_shape(runtime, shape: TreeShape, drafter=None) -> SpeculativeDecoder:
    return runtime.speculative.with_tree(shape, drafter)


@SETTINGS
@given(shape=random_trees(), prompt=prompts(), new=st.integers(1, 20))
def test_draft_model_greedy_equals_autoregressive(pair_artifact, shape, prompt, new):
    speculative, plain = pair_artifact
    expected = plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids
    got = with_shape(speculative, shape).generate(prompt, new).token_ids
    assert got == expected


@SETTINGS
@given(shape=random_trees(), prompt=prompts(), new=st.integers(1, 20))
def test_prompt_lookup_greedy_equals_autoregressive(pair_artifact, shape, prompt, new):
    speculative, plain = pair_artifact
    expected = plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids
    got = with_shape(speculative, shape, PromptLookupDrafter()).generate(prompt, new).token_ids
    assert got == expected


def test_eos_is_exact(pair_artifact):
    speculative, plain = pair_artifact
    free = plain.generate([4, 5, 6] * 4, max_new_tokens=20, eos_token_id=[]).token_ids
    eos = free[6]
    expected = free[: free.index(eos) + 1]
    for drafter in (None, PromptLookupDrafter()):
        out = with_shape(speculative, k_ary(3, 3), drafter).generate([4, 5, 6] * 4, 20, eos_token_ids=[eos])
        assert out.token_ids == expected and out.stop_reason == "eos"


def test_kv_compaction_leaves_the_autoregressive_cache(pair_artifact):
    speculative, plain = pair_artifact
    prompt = [7, 8, 9, 10] * 3
    plain.generate(prompt, max_new_tokens=16, eos_token_id=[])
    out = with_shape(speculative, k_ary(2, 3), PromptLookupDrafter()).generate(prompt, 16)
    assert any(step.accepted > 0 for step in out.steps)  # compaction actually ran
    # Both caches hold prompt + emitted tokens (speculation may hold a few accepted ones more).
    filled = plain.step_model.cache.length
    assert speculative.step_model.cache.length >= filled == len(prompt) + 15
    np.testing.assert_allclose(speculative.step_model.cache.k[:, :, :, :filled],
                               plain.step_model.cache.k[:, :, :, :filled], atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(speculative.step_model.cache.v[:, :, :, :filled],
                               plain.step_model.cache.v[:, :, :, :filled], atol=1e-9)  # fmt: skip


def test_no_match_means_a_plain_step(pair_artifact):
    speculative, _ = pair_artifact
    out = with_shape(speculative, chain(4), PromptLookupDrafter()).generate([1, 2, 3, 4, 5], 3)
    first = out.steps[0]
    assert first.drafted == 0 and first.emitted == 1


def test_mean_accepted_is_reported(pair_artifact):
    speculative, _ = pair_artifact
    out = speculative.generate([3, 4, 5] * 5, max_new_tokens=24, eos_token_id=[])
    assert out.to_json()["mean_accepted"] >= 1.0
    emitted = sum(step.emitted for step in out.result.steps)
    assert emitted == len(out.token_ids) - 1  # the first token comes from the prefill


def test_sampled_speculative_decoding_is_seeded(pair_artifact):
    speculative, _ = pair_artifact
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.2, top_k=0, eos_token_id=[])
    one = speculative.generate([2, 3], seed=1, **kwargs).token_ids
    assert one == speculative.generate([2, 3], seed=1, **kwargs).token_ids
    assert one != speculative.generate([2, 3], seed=2, **kwargs).token_ids


def test_a_draft_model_is_built_through_the_pass_manager(pair_artifact):
    speculative, _ = pair_artifact
    passes = speculative.manifest.speculative.draft_model.pipeline
    assert [entry.name for entry in passes] == ["EliminateDeadCode"]  # no --draft-vocab: no shrink


def test_draft_model_drafts_a_new_prompt_from_its_own_prefix(pair_artifact):
    """After one sequence, the draft model's cache holds that sequence: a new prompt must not reuse it."""
    speculative, _ = pair_artifact
    decoder = with_shape(speculative, k_ary(2, 2))
    drafter, sampling = decoder.drafter, skiptree.runtime.sampling.SamplingConfig()
    second = [7, 8, 9, 10, 11, 12]
    drafter.propose([1, 2, 3, 4, 5, 6, 7, 8, 9], decoder.shape, sampling, None)
    after_other = drafter.propose(second, decoder.shape, sampling, None)
    drafter.cached, drafter.model.cache.length = [], 0  # as freshly loaded
    fresh = drafter.propose(second, decoder.shape, sampling, None)
    assert after_other.tokens == fresh.tokens


FUSED_CONFIGS = {
    "llama": transformers.LlamaConfig(**dict(TINY_LLAMA, hidden_size=64)),
    "qwen2-bias": transformers.Qwen2Config(**dict(TINY_LLAMA, hidden_size=64)),
}


@pytest.fixture(scope="module", params=sorted(FUSED_CONFIGS))
def fused_artifact(request, tmp_path_factory):
    """A float32 tiny target with head size 16, so its verify graph runs ORT's fused ops; with
    transformers' own model of the same weights. Qwen2 adds q/k/v biases to the packed projection."""
    root = tmp_path_factory.mktemp("fused")
    reference = write_tiny_model(root / "target", FUSED_CONFIGS[request.param])
    write_word_tokenizer(root / "target")
    art = skiptree.compile(root / "target", root / "artifact", max_seq_len=64, draft="prompt-lookup",
                           tree="k-ary:2x2", max_tree=40)  # fmt: skip
    return skiptree.load(art), skiptree.load(art, speculative=False), reference, art


def test_fused_artifact_runs_contrib_ops_on_packed_projections(fused_artifact):
    import onnx

    *_, art = fused_artifact
    graph = onnx.load(str(art / "verify.onnx"), load_external_data=False).graph
    layers = TINY_LLAMA["num_hidden_layers"]
    attention = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    assert len(attention) == layers
    assert all(node.input[1] == node.input[2] == "" for node in attention)  # q|k|v packed: one input
    norms = [node for node in graph.node if node.op_type == "SkipSimplifiedLayerNormalization"]
    assert len(norms) == 2 * layers  # every norm but the first layer's, which has nothing to add
    assert all(node.output[1] == node.output[2] == "" for node in norms)  # mean, 1/std not computed
    weights = {init.name for init in graph.initializer}
    projections = [node for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    assert len(projections) == 5 * layers + 1  # qkv, o, gate, up, down per layer; the head


@SETTINGS
@given(shape=random_trees(), prompt=prompts(), new=st.integers(1, 20))
def test_fused_prompt_lookup_greedy_equals_autoregressive(fused_artifact, shape, prompt, new):
    speculative, plain, _, _ = fused_artifact
    expected = plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids
    got = with_shape(speculative, shape, PromptLookupDrafter()).generate(prompt, new).token_ids
    assert got == expected


@pytest.mark.parametrize("prompt", [[5, 9, 13], [3, 4, 5] * 4, [60, 2, 77, 41, 8]])
def test_fused_autoregressive_equals_transformers_greedy(fused_artifact, prompt):
    import torch

    _, plain, reference, _ = fused_artifact
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)  # fmt: skip
    expected = expected[0, len(prompt) :].tolist()
    assert plain.generate(prompt, max_new_tokens=24, eos_token_id=[]).token_ids == expected


def test_plain_artifact_decodes_through_a_fused_verify_graph(tmp_path):
    """Without a drafter, an ORT artifact of a model that fuses holds only the fused verify graph
    (no step, no compact graph) and decodes as transformers does."""
    import torch

    reference = write_tiny_model(tmp_path / "target", FUSED_CONFIGS["llama"])
    write_word_tokenizer(tmp_path / "target")
    art = skiptree.compile(tmp_path / "target", tmp_path / "artifact", max_seq_len=64, prefill_chunk=8)
    runtime = skiptree.load(art)
    assert list(runtime.manifest.graphs) == [GraphName.VERIFY] and runtime.speculative is None
    assert runtime.manifest.decode_mode == DecodeMode.PLAIN
    assert not runtime.step_model.pads_lone_rows and runtime.step_model.chunk == 8
    prompt = [3, 4, 5] * 4  # 12 tokens: prefilled in chunks of 8 and 4
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)  # fmt: skip
    assert runtime.generate(prompt, max_new_tokens=24, eos_token_id=[]).token_ids == expected[0, 12:].tolist()
