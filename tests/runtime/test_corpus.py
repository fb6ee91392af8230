"""Corpus lookup: suffix-array matching, trie-shaped proposals, the datastore in the artifact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import skiptree
from skiptree.compiler.compile import compile_model
from skiptree.compiler.options import CompileOptionError, CompileOptions
from skiptree.runtime.corpus import SEPARATOR, CorpusDrafter, CorpusIndex, suffix_array
from skiptree.runtime.draft_gate import VerifyCost
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import parse_tree

QUIET = dict(log=lambda message: None)


def words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)  # the tiny word tokenizer: "t<i>" is id i


@pytest.fixture(scope="module")
def corpus_setup(tiny_artifact, tmp_path_factory):
    """A corpus of the tiny model's own greedy continuations (so its drafts get accepted), compiled
    alone and merged with prompt lookup and recycling; and the plain runtime."""
    folder, plain_artifact = tiny_artifact
    plain = skiptree.load(plain_artifact)
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    for name, prompt in (("a.txt", [5, 6, 7]), ("sub/b.txt", [10, 11, 12, 13])):
        continuation = plain.generate(prompt, max_new_tokens=30, eos_token_id=[]).token_ids
        (docs / name).write_text(words(prompt + continuation))
    (docs / ".hidden.txt").write_text(words([40] * 50))  # hidden: not read
    (docs / "blob.bin").write_bytes(b"\x00\x01\xff" * 10)  # binary: skipped
    corpus = compile_model(folder, root / "corpus", CompileOptions(max_seq_len=48, draft=f"corpus:{docs}",
                                                                     tree="k-ary:2x3"), **QUIET)  # fmt: skip
    merged = compile_model(folder, root / "merged", CompileOptions(
        max_seq_len=48, draft=f"lookup+recycle+corpus:{docs}", tree="k-ary:2x3"), **QUIET)  # fmt: skip
    runtimes = skiptree.load(corpus), skiptree.load(merged)
    for runtime in runtimes:  # the measured T(n) depends on the machine's load: free verification here
        runtime.speculative.drafter.cost = VerifyCost((1,), (1.0,))
    return *runtimes, plain, docs


def naive_suffix_array(tokens: list[int]) -> list[int]:
    return sorted(range(len(tokens)), key=lambda start: tokens[start:])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 4), max_size=40))
def test_suffix_array_sorts_every_suffix(tokens):
    assert suffix_array(np.asarray(tokens, dtype=np.int32)).tolist() == naive_suffix_array(tokens)


@settings(max_examples=60, deadline=None)
@given(documents=st.lists(st.lists(st.integers(0, 3), max_size=12), min_size=1, max_size=4),
       pattern=st.lists(st.integers(0, 3), min_size=1, max_size=3))  # fmt: skip
def test_find_returns_exactly_the_occurrences(documents, pattern):
    index = CorpusIndex.build(documents)
    tokens = index.tokens.tolist()
    expected = sorted(i for i in range(len(tokens)) if tokens[i : i + len(pattern)] == pattern)
    lo, hi = index.find(pattern)
    assert sorted(index.suffixes[lo:hi].tolist()) == expected


@settings(max_examples=80, deadline=None)
@given(documents=st.lists(st.lists(st.integers(0, 3), max_size=12), min_size=1, max_size=4),
       context=st.lists(st.integers(0, 3), max_size=10), min_match=st.integers(1, 3))  # fmt: skip
def test_match_finds_the_longest_occurring_context_suffix(documents, context, min_match):
    """Against a brute force over every length (the search itself stops at the first miss)."""
    index = CorpusIndex.build(documents)
    tokens = index.tokens.tolist()

    def occurs(length: int) -> bool:
        pattern = context[len(context) - length :]
        return any(tokens[i : i + length] == pattern for i in range(len(tokens)))

    lengths = [n for n in range(min_match, min(6, len(context)) + 1) if occurs(n)]
    lo, hi, length = index.match(context, 6, min_match)
    assert length == max(lengths, default=0)
    assert (lo, hi) == (index.find(context[len(context) - length :]) if length else (0, 0))


def test_the_drafter_proposes_the_longest_matchs_continuations_by_frequency():
    index = CorpusIndex.build([[1, 2, 3, 5, 6], [1, 2, 3, 5, 7], [1, 2, 3, 4]])
    assert index.tokens.tolist()[-1] == SEPARATOR and len(index) == 17
    drafter = CorpusDrafter(index)
    draft = drafter.propose([8, 1, 2], parse_tree("k-ary:2x3"), SamplingConfig(), np.random.default_rng(0))
    # [8, 1, 2] never occurs, [1, 2] three times: then 3; 5 (twice) before 4; 6 and 7 after 5; the
    # document ending after 4 proposes nothing (no match runs across documents).
    assert draft.tokens == [3, 5, 4, 6, 7] and draft.parents == [-1, 0, 0, 1, 1]
    assert draft.sources == ["corpus"] * 5
    nothing = drafter.propose([9, 9], parse_tree("chain:3"), SamplingConfig(), np.random.default_rng(0))
    assert nothing.tokens == []


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.one_of(st.lists(st.integers(3, 96), min_size=1, max_size=10),
                        st.sampled_from([[5, 6, 7], [10, 11, 12], [6, 7]])),
       new=st.integers(1, 24), merged=st.booleans())  # fmt: skip
def test_corpus_and_merged_drafts_are_lossless(corpus_setup, prompt, new, merged):
    corpus, combined, plain, _ = corpus_setup
    speculative = combined if merged else corpus
    expected = plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids
    assert speculative.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids == expected


def test_sources_report_what_they_contributed(corpus_setup):
    corpus, combined, plain, _ = corpus_setup
    prompt = [5, 6, 7]  # its continuation is in the corpus
    expected = plain.generate(prompt, max_new_tokens=24, eos_token_id=[]).token_ids
    for runtime in (corpus, combined):
        output = runtime.generate(prompt, max_new_tokens=24, eos_token_id=[])
        assert output.token_ids == expected
        counts = output.to_json()["tokens_by_source"]
        assert sum(counts.values()) == 24 and counts["target"] <= 12  # shared tokens: the best-ranked source
        assert runtime is combined or counts["corpus"] >= 12
        assert output.result.mean_accepted > 2.0
    assert combined.speculative.drafter.name == "prompt-lookup+recycle+corpus"


def test_the_datastore_round_trips_through_the_artifact(corpus_setup):
    corpus, combined, _, docs = corpus_setup
    entry = corpus.manifest.speculative.corpus
    assert (entry.documents, entry.skipped_files) == (2, 1)  # .hidden.txt not read, blob.bin skipped
    assert entry.file in corpus.manifest.files and entry.bytes == 8 * entry.tokens
    texts = [(docs / "a.txt").read_text(), (docs / "sub" / "b.txt").read_text()]
    built = CorpusIndex.build([[int(word[1:]) for word in text.split()] for text in texts])
    index = skiptree.load(corpus.folder).speculative.drafter.by_name["corpus"].index
    np.testing.assert_array_equal(index.tokens, built.tokens)
    np.testing.assert_array_equal(index.suffixes, built.suffixes)
    assert combined.manifest.speculative.sources == ("prompt-lookup", "recycle", "corpus")


@pytest.mark.parametrize(("draft", "message"), [
    ("corpus:/no/such/folder", "no file or folder /no/such/folder"),
    ("lookup+medusa", "'medusa' is not a free drafter"),
    ("lookup+prompt-lookup", "names a source twice"),
])  # fmt: skip
def test_bad_corpus_options_are_refused(tiny_artifact, tmp_path, draft, message):
    folder, _ = tiny_artifact
    with pytest.raises(CompileOptionError, match=message):
        compile_model(folder, tmp_path / "art", CompileOptions(max_seq_len=48, draft=draft), **QUIET)


def test_a_corpus_over_the_limit_is_refused(tiny_artifact, tmp_path, monkeypatch):
    from skiptree.compiler.drafters import corpus as corpus_build

    folder, _ = tiny_artifact
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "big.txt").write_text(words([5] * 400))
    monkeypatch.setattr(corpus_build, "MAX_CORPUS_BYTES", 1000)
    with pytest.raises(CompileOptionError, match="holds 1,199 bytes, more than the limit of 1,000"):
        options = CompileOptions(max_seq_len=48, draft=f"corpus:{tmp_path}/docs")
        compile_model(folder, tmp_path / "art", options, **QUIET)
    assert not (tmp_path / "art").exists()  # nothing half-written


def test_the_gate_decodes_plainly_when_nothing_pays(corpus_setup):
    corpus, _, plain, _ = corpus_setup
    cost = corpus.manifest.speculative.verify_cost  # measured at compile time
    assert cost.nodes[0] == 1 and len(cost.ratio) == len(cost.nodes) and cost.plain_ms > 0
    assert list(cost.ratio) == sorted(cost.ratio)
    drafter = corpus.speculative.drafter
    measured, drafter.cost = drafter.cost, VerifyCost((1,), (100.0,))  # verifying anything: 100x a step
    try:
        result = corpus.generate([5, 6, 7], max_new_tokens=16, eos_token_id=[]).result
    finally:
        drafter.cost = measured
    assert all(step.drafted == 0 for step in result.steps)
    assert result.token_ids == plain.generate([5, 6, 7], max_new_tokens=16, eos_token_id=[]).token_ids
