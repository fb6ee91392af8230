"""Token Recycling: a bounded table of the target's own candidates; decoding stays lossless."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.compiler.compile import compile_model
from skiptree.compiler.options import CompileOptions
from skiptree.runtime.draft_gate import VerifyCost
from skiptree.runtime.recycling import EMPTY, PAIR_SLOTS, RecyclingDrafter, top_candidates
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import parse_tree


@pytest.fixture(scope="module")
def recycling(tiny_artifact, tmp_path_factory):
    """(speculative, plain) runtimes of one tiny Llama artifact drafting with Token Recycling."""
    folder, _ = tiny_artifact
    root = tmp_path_factory.mktemp("recycle")
    options = CompileOptions(max_seq_len=48, draft="recycle", tree="k-ary:2x3")
    artifact = compile_model(folder, root / "artifact", options, log=lambda message: None)
    speculative = skiptree.load(artifact)
    speculative.speculative.drafter.cost = VerifyCost((1,), (1.0,))  # not the load-dependent measured one
    return speculative, skiptree.load(artifact, speculative=False)


def test_top_candidates_are_the_largest_logits_best_first():
    logits = np.array([[0.1, 3.0, -1.0, 2.0, 2.5], [5.0, 4.0, 3.0, 2.0, 1.0]], dtype=np.float32)
    assert top_candidates(logits, 3).tolist() == [[1, 4, 3], [0, 1, 2]]


@pytest.mark.parametrize("vocab", [49152, 151936, 1000, 200])  # strided lanes; odd and small: direct
def test_top_candidates_on_real_vocabularies_equal_a_full_sort(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((9, vocab)).astype(np.float32)
    columns = vocab // 32
    logits[0, [5, 5 + columns, 5 + 2 * columns, 5 + 31 * columns]] = [9.0, 8.0, 7.0, 6.0]  # one lane column
    logits[1, -8:] = np.arange(10.0, 18.0)  # the top 8 at the very end
    expected = np.argsort(-logits, axis=-1, kind="stable")[:, :8]
    np.testing.assert_array_equal(top_candidates(logits, 8), expected)
    np.testing.assert_array_equal(top_candidates(logits[:1], 1), expected[:1, :1])


def test_the_table_is_bounded_and_drafts_the_shape_breadth_first():
    drafter = RecyclingDrafter(vocab_size=10, width=2)
    size = drafter.nbytes
    logits = np.zeros((3, 10), dtype=np.float32)
    logits[0, [7, 8]] = [2.0, 1.0]  # after token 4: 7, then 8
    logits[1, [5, 6]] = [2.0, 1.0]  # after token 7: 5, then 6
    logits[2, 9] = 1.0  # after token 8: 9 first
    for _ in range(50):  # observing never grows it
        drafter.observe_logits([4, 7, 8], logits)
    assert drafter.nbytes == size == 10 * 2 * 4 + PAIR_SLOTS * (8 + 2 * 4) and drafter.table.shape == (10, 2)
    draft = drafter.propose([1, 2, 4], parse_tree("k-ary:2x2"), SamplingConfig(), np.random.default_rng(0))
    assert draft.tokens == [7, 8, 5, 6, 9, 0] and draft.parents == [-1, -1, 0, 0, 1, 1]
    empty = RecyclingDrafter(vocab_size=10, width=2)
    assert (empty.table == EMPTY).all()
    assert empty.propose([3], parse_tree("chain:3"), SamplingConfig(), np.random.default_rng(0)).tokens == []


def test_a_pair_row_is_preferred_to_the_token_row_and_the_cache_stays_bounded():
    drafter = RecyclingDrafter(vocab_size=10, width=2, pair_slots=4)
    size = drafter.nbytes
    logits = np.zeros((2, 10), dtype=np.float32)
    logits[0, [7, 8]] = [2.0, 1.0]  # after 3 then 4: 7, then 8
    logits[1, [5, 6]] = [2.0, 1.0]  # after 2 then 4: 5, then 6 (token 4's own row: the latest, 5 6)
    drafter.observe_logits([4, 4], logits, [3, 2])
    assert drafter.candidates([1, 3, 4], [], 2) == [7, 8] and drafter.matched == 2  # the pair (3, 4)
    assert drafter.candidates([1, 2, 4], [], 2) == [5, 6] and drafter.matched == 2
    assert drafter.candidates([1, 9, 4], [], 1) == [5] and drafter.matched == 0  # no pair: the token row
    assert drafter.candidates([4], [], 2) == [5, 6] and drafter.matched == 0  # nothing before it
    assert drafter.candidates([1], [3, 4], 2) == [7, 8]  # a path continues the context
    for before in range(10):  # more pairs than slots: old ones are overwritten, nothing grows
        drafter.observe_logits([4], logits[1:], [before])
    assert drafter.nbytes == size and (drafter.pair_keys >= 0).sum() <= 4


def test_prefill_records_every_prompt_token_and_its_pair(recycling):
    speculative, _ = recycling
    prompt = [11, 12, 13, 14, 15, 16]
    decoder = speculative.speculative.with_tree(parse_tree("chain:1"), RecyclingDrafter(
        speculative.manifest.model.config["vocab_size"]))  # fmt: skip
    decoder.generate(prompt, max_new_tokens=1)
    step = speculative.step_model
    step.cache.length = 0
    expected = top_candidates(step.forward(prompt, ("logits",))[0], 8)
    drafter = decoder.drafter
    np.testing.assert_array_equal(drafter.table[prompt], expected)
    for before, token, row in zip(prompt[:-1], prompt[1:], expected[1:], strict=True):
        assert drafter.candidates([before, token], [], 8) == row.tolist() and drafter.matched == 2


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.one_of(st.lists(st.integers(3, 96), min_size=1, max_size=12),
                        st.lists(st.integers(3, 96), min_size=1, max_size=4).map(lambda w: w * 4)),
       new=st.integers(1, 24))  # fmt: skip
def test_recycling_is_lossless(recycling, prompt, new):
    speculative, plain = recycling
    expected = plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids
    assert speculative.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids == expected


def test_recycled_candidates_get_accepted(recycling):
    speculative, plain = recycling
    prompt = [5, 6, 7, 8] * 3
    result = speculative.generate(prompt, max_new_tokens=32, eos_token_id=[]).result
    assert result.token_ids == plain.generate(prompt, max_new_tokens=32, eos_token_id=[]).token_ids
    assert sum(step.accepted for step in result.steps) > 0
    assert speculative.manifest.speculative.drafter == "recycle"


def test_the_warm_table_round_trips_through_the_artifact(recycling, tiny_artifact):
    """Compile-time warm start on the calibration prompts: the table and the pair cache, saved
    (safetensors), loaded as saved."""
    from safetensors.numpy import load_file

    from skiptree.compiler.compile import calibration_prompts
    from skiptree.compiler.drafters.recycle_warm import warm_state
    from skiptree.models.loader import load_model
    from skiptree.runtime.tokenizer import Tokenizer

    speculative, _ = recycling
    entry = speculative.manifest.speculative.recycle
    assert entry.file in speculative.manifest.files and entry.rows_filled > 0
    saved = load_file(str(speculative.folder / entry.file))
    assert entry.pairs_filled == int((saved["pair_keys"] != EMPTY).sum()) > 0
    folder, _ = tiny_artifact
    prompts = calibration_prompts(CompileOptions(), Tokenizer.from_folder(folder))
    again = warm_state(load_model(folder), prompts, 48)  # deterministic
    for name, array in saved.items():
        np.testing.assert_array_equal(array, again[name])
    loaded = skiptree.load(speculative.folder).speculative.drafter.by_name["recycle"]
    for name, array in loaded.state().items():
        np.testing.assert_array_equal(array, saved[name])
    with pytest.raises(ValueError, match="recycling table .* does not fit"):
        RecyclingDrafter(vocab_size=5, state={"table": saved["table"]})
    with pytest.raises(ValueError, match="recycling pair_keys .* does not fit"):
        RecyclingDrafter(vocab_size=len(saved["table"]), pair_slots=16, state=saved)


def test_a_warm_pair_row_drafts_the_calibration_continuation(tiny_artifact):
    """The warm pair cache holds what the target predicted after a calibration pair: a fresh
    decoder drafts it on the first step, before any verify step has run."""
    from skiptree.compiler.drafters.recycle_warm import warm_state
    from skiptree.models.loader import load_model

    folder, _ = tiny_artifact
    prompt = [3, 9, 4, 11, 7, 4, 2]  # token 4 twice: its own row is the second, the pair (9, 4) the first
    state = warm_state(load_model(folder), [prompt], 48, new_tokens=0)
    warm = RecyclingDrafter(len(state["table"]), state=state)
    cold = RecyclingDrafter(len(state["table"]), state={"table": state["table"]})
    slot = int(warm.pair_slot(np.asarray([9 * len(state["table"]) + 4]))[0])
    first, second = state["pair_rows"][slot].tolist(), state["table"][4].tolist()
    assert first != second and -1 not in first
    assert warm.candidates([3, 9], [4], 8) == first and warm.matched == 2
    assert cold.candidates([3, 9], [4], 8) == second and cold.matched == 0
    assert warm.candidates([5], [4], 8) == second  # the pair (5, 4) was never seen
