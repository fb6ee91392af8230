"""Continuous batching is lossless: with random arrivals, prompts and lengths, every request's tokens
equal its own single-request decoding (greedy, and seeded sampling), on tiny random Llamas compiled
with a batched verify graph; and the step budget behaves (plain steps when drafts do not pay)."""

from __future__ import annotations

import random

import pytest
import transformers
from conftest import TINY_LLAMA, write_tiny_model, write_word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.runtime.artifact import free_sources
from skiptree.runtime.batch_step import BatchRows
from skiptree.runtime.onnx_step import SessionConfig
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import TreeShape
from skiptree.serve.budget import BatchCost, plan_tokens
from skiptree.serve.engine import BatchEngine, Request

SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FUSABLE = dict(TINY_LLAMA, hidden_size=64)  # head size 16: the single-request graph would fuse attention
ROWS = 4


@pytest.fixture(scope="module", params=["prompt-lookup", "prompt-lookup+recycle"])
def batched(request, tmp_path_factory):
    """(artifact, plain runtime) of a tiny Llama compiled with --max-batch 4 and a free drafter."""
    root = tmp_path_factory.mktemp("batched")
    write_tiny_model(root / "target", transformers.LlamaConfig(**FUSABLE))
    write_word_tokenizer(root / "target")
    art = skiptree.compile(root / "target", root / "artifact", max_seq_len=64, draft=request.param,
                           tree="k-ary:2x3", max_tree=16, max_batch=ROWS)  # fmt: skip
    return art, skiptree.load(art, speculative=False)


def engine_of(art, cost: BatchCost | None = None) -> BatchEngine:
    manifest = skiptree.load(art, speculative=False).manifest
    verify, spec = manifest.graphs["verify"], manifest.speculative
    rows = BatchRows(art / verify.file, verify.signature, ROWS, SessionConfig(threads=1))
    shape = TreeShape(spec.tree.parents, spec.tree.spec)
    return BatchEngine(rows, verify.max_tree, free_sources(art, manifest, spec), shape, cost)


def run_all(engine: BatchEngine, requests: list[Request], arrivals: list[int]) -> int:
    """Submit request i before step arrivals[i] (sorted), step until every request finished."""
    order, steps = sorted(zip(arrivals, range(len(requests)), strict=True)), 0
    while order or not engine.idle():
        while order and order[0][0] <= steps:
            engine.submit(requests[order.pop(0)[1]])
        engine.step()
        steps += 1
        assert steps < 2000
    return steps


def prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    cycle = [rng.randrange(3, 97) for _ in range(3)]  # repeats give prompt lookup something to find
    return [[rng.randrange(3, 97) for _ in range(rng.randrange(1, 20))] + cycle * rng.randrange(0, 4)
            for _ in range(count)]  # fmt: skip


@SETTINGS
@given(seed=st.integers(0, 10_000), count=st.integers(1, 7), gaps=st.lists(st.integers(0, 3), min_size=7))
def test_greedy_under_batching_equals_single_request(batched, seed, count, gaps):
    art, plain = batched
    rng = random.Random(seed)
    cases = [(prompt, rng.randrange(1, 64 - len(prompt))) for prompt in prompts(seed, count)]
    expected = [plain.generate(p, max_new_tokens=n, eos_token_id=[]).token_ids for p, n in cases]
    requests = [Request(p, n) for p, n in cases]
    arrivals = [sum(gaps[: i + 1]) for i in range(count)]
    run_all(engine_of(art), requests, arrivals)
    assert [r.tokens for r in requests] == expected
    assert all(r.finish_reason == "length" for r in requests)


def test_eos_ends_a_request_exactly(batched):
    art, plain = batched
    prompt = prompts(1, 1)[0]
    free = plain.generate(prompt, max_new_tokens=30, eos_token_id=[]).token_ids
    eos = free[len(free) // 2]
    expected = plain.generate(prompt, max_new_tokens=30, eos_token_id=[eos]).token_ids
    request = Request(prompt, 30, eos_token_ids=frozenset({eos}))
    others = [Request(p, 20) for p in prompts(2, 3)]
    run_all(engine_of(art), [request, *others], [0, 0, 1, 2])
    assert request.tokens == expected and request.finish_reason == "stop"


def test_seeded_sampling_reproduces_plain_sampling(batched):
    art, plain = batched
    sampling = SamplingConfig(True, 0.8, 0, 0.9)
    cases = [(prompt, 12 + i, 100 + i) for i, prompt in enumerate(prompts(3, 5))]
    expected = [plain.generate(p, max_new_tokens=n, do_sample=True, temperature=0.8, top_k=0, top_p=0.9,
                               seed=s, eos_token_id=[]).token_ids for p, n, s in cases]  # fmt: skip
    requests = [Request(p, n, sampling, s) for p, n, s in cases]
    requests.insert(2, Request(prompts(4, 1)[0], 20))  # a greedy neighbour that speculates
    run_all(engine_of(art), requests, [0, 1, 1, 2, 5, 6])
    del requests[2]
    assert [r.tokens for r in requests] == expected


def test_a_cancelled_request_frees_its_row_and_the_rest_stay_exact(batched):
    art, plain = batched
    cases = prompts(5, ROWS + 2)
    expected = [plain.generate(p, max_new_tokens=30, eos_token_id=[]).token_ids for p in cases]
    engine = engine_of(art)
    requests = [Request(p, 30) for p in cases]
    for request in requests:
        engine.submit(request)
    for _ in range(6):
        engine.step()
    requests[1].cancel()
    run_all(engine, [], [])
    assert requests[1].finish_reason == "cancelled" and len(requests[1].tokens) < 30
    assert [r.tokens for i, r in enumerate(requests) if i != 1] == [
        e for i, e in enumerate(expected) if i != 1
    ]


def test_long_prompts_prefill_in_chunks_between_decode_steps(batched):
    art, plain = batched
    long = prompts(6, 1)[0] * 4  # several 16-token chunks
    short = Request(prompts(7, 1)[0], 30)
    engine = engine_of(art)
    engine.submit(short)
    engine.step()  # the short request prefills and starts decoding
    engine.submit(Request(long[:60], 2))
    decoded_while_prefilling = 0
    for _ in range(3):
        stats = engine.step()
        assert stats.prefill_tokens <= 16
        decoded_while_prefilling += stats.emitted
    assert decoded_while_prefilling >= 3  # one decode call per step, prefill or not


def test_the_budget_drops_drafts_that_do_not_pay():
    flat = BatchCost((1, 2, 4, 8), ((1.0, 1.0, 1.0, 1.0),) * 4)  # extra rows free: verify everything
    assert plan_tokens([[0.1, 0.05], [0.2]], flat, 8) == 3
    steep = BatchCost((1, 2, 4, 8), ((1.0, 1.5, 2.5, 4.5),) * 4)  # every token costs half a step
    assert plan_tokens([[0.9, 0.8], [0.95, 0.9, 0.85]], steep, 8) == 3  # 5.55 tokens / 2.0
    assert plan_tokens([[0.1, 0.05], [0.2]], steep, 8) == 1  # unlikely drafts: plain steps for all
    assert plan_tokens([[], []], steep, 8) == 1


def test_drafts_are_accepted_under_batching(batched):
    """The batched steps really speculate: fewer target steps than tokens (same tokens as plain)."""
    art, plain = batched
    cases = prompts(8, ROWS)
    requests = [Request(p, 30) for p in cases]
    run_all(engine_of(art), requests, [0, 0, 0, 0])
    assert [r.tokens for r in requests] == [plain.generate(p, max_new_tokens=30, eos_token_id=[]).token_ids
                                            for p in cases]  # fmt: skip
    emitted_by_steps = sum(len(r.tokens) - 1 for r in requests)  # the first token comes from prefill
    assert sum(r.target_steps for r in requests) < emitted_by_steps


def test_int8_activations_pad_lone_rows_up_to_a_full_context(tmp_path):
    """An int4 artifact with int8 activations pads one-row calls to two (as `generate` does), except
    where the context has no room left: requests that fill it exactly stay exact and never fail."""
    write_tiny_model(tmp_path / "target", transformers.LlamaConfig(**FUSABLE))
    write_word_tokenizer(tmp_path / "target")
    art = skiptree.compile(tmp_path / "target", tmp_path / "int4", max_seq_len=48, draft="prompt-lookup",
                           tree="chain:3", max_tree=8, max_batch=ROWS, quantize="int4")  # fmt: skip
    plain = skiptree.load(art, speculative=False)
    manifest = plain.manifest
    verify, spec = manifest.graphs["verify"], manifest.speculative
    assert verify.quantization["accuracy_level"] == 4
    rows = BatchRows(art / verify.file, verify.signature, ROWS, SessionConfig(threads=1), pads_lone_rows=True)
    engine = BatchEngine(rows, verify.max_tree, free_sources(art, manifest, spec),
                         TreeShape(spec.tree.parents, spec.tree.spec))  # fmt: skip
    cases = prompts(9, 3)
    expected = [plain.generate(p, max_new_tokens=48 - len(p), eos_token_id=[]).token_ids for p in cases]
    requests = [Request(p, 48 - len(p)) for p in cases]
    run_all(engine, requests, [0, 0, 2])
    assert [r.tokens for r in requests] == expected
