"""Merged free drafters: one tree from several sources, ranked by their measured acceptance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skiptree.compiler.specs import CompileOptionError, DraftModel, FreeDraft, parse_draft
from skiptree.runtime.corpus import CorpusDrafter, CorpusIndex
from skiptree.runtime.drafters import Draft, PromptLookupDrafter
from skiptree.runtime.merged_draft import MergedDrafter
from skiptree.runtime.recycling import RecyclingDrafter
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import parse_tree


def propose(drafter, context, tree="k-ary:2x2"):
    return drafter.propose(context, parse_tree(tree), SamplingConfig(), np.random.default_rng(0))


def draft_of(source: str, evidence: int) -> Draft:
    draft = Draft()
    draft.add(1, -1, source, evidence)
    return draft


def recycling_with(rows: dict[int, list[int]]) -> RecyclingDrafter:
    drafter = RecyclingDrafter(vocab_size=20, width=2)
    for token, candidates in rows.items():
        drafter.table[token, : len(candidates)] = candidates
    return drafter


def test_sources_fill_each_nodes_ranks_in_turn_without_duplicates():
    recycle = recycling_with({3: [4, 9], 4: [5, 6], 9: [1]})
    merged = MergedDrafter([PromptLookupDrafter(), recycle])
    context = [1, 2, 3, 4, 7, 1, 2, 3]  # lookup: after 1 2 3 came 4 (then 7)
    draft = propose(merged, context)
    # root: lookup's 4, then recycle's 9 (its 4 is a duplicate); under 4: lookup's 7, recycle's 5;
    # under 9: recycle's 1.
    assert draft.tokens == [4, 9, 7, 5, 1] and draft.parents == [-1, -1, 0, 0, 1]
    assert draft.sources == ["prompt-lookup", "recycle", "prompt-lookup", "recycle", "recycle"]


def test_sources_are_ranked_by_their_measured_acceptance():
    recycle = recycling_with({3: [4, 9]})
    merged = MergedDrafter([PromptLookupDrafter(), recycle])
    assert [source.name for source in merged.ranked()] == ["prompt-lookup", "recycle"]  # untried: as given
    assert propose(merged, [1, 2, 3, 5, 1, 2, 3], "k-ary:2x1").tokens == [5, 4]  # lookup's 5 first
    merged.observe_accepted(2, [2])  # recycle's 4 (its own rank 0) accepted, lookup's 5 not
    assert merged.acceptance.rate("recycle", 0) == pytest.approx(2 / 3)
    assert merged.acceptance.rate("prompt-lookup", 0) == pytest.approx(1 / 3)
    assert [source.name for source in merged.ranked()] == ["recycle", "prompt-lookup"]
    assert propose(merged, [1, 2, 3, 5, 1, 2, 3], "k-ary:2x1").tokens == [4, 9]  # recycle first now


def test_candidates_are_ordered_by_their_predicted_acceptance_at_their_evidence():
    recycle = recycling_with({3: [4, 9]})
    merged = MergedDrafter([PromptLookupDrafter(max_ngram=6, min_ngram=1), recycle])
    for _ in range(4):  # long lookup matches always accepted, one-token matches never, recycle half the time
        merged.acceptance.record(draft_of("prompt-lookup", 9), verified=1, accepted=[1])
        merged.acceptance.record(draft_of("prompt-lookup", 1), verified=1, accepted=[])
        merged.acceptance.record(draft_of("recycle", 0), verified=1, accepted=[1])
        merged.acceptance.record(draft_of("recycle", 0), verified=1, accepted=[])
    long_match = [1, 2, 3, 5, 7, 1, 2, 3]  # lookup matched 3 tokens (class 3: untried, 1/2)
    assert propose(merged, long_match, "k-ary:2x1").sources == ["prompt-lookup", "recycle"]  # a tie: rank 0s
    one_token = [6, 3, 5, 8, 3]  # lookup matched "3" alone: 1/6, below recycle's 9 at rank 1 (1/2)
    draft = propose(merged, one_token, "k-ary:3x1")
    assert draft.tokens == [4, 9, 5] and draft.sources == ["recycle", "recycle", "prompt-lookup"]
    assert draft.ranks == [0, 1, 0]  # ranks among each source's own candidates


def test_a_source_with_nothing_leaves_the_tree_to_the_others():
    corpus = CorpusDrafter(CorpusIndex.build([[8, 8, 8]]))
    merged = MergedDrafter([corpus, PromptLookupDrafter()])
    draft = propose(merged, [5, 6, 5, 6], "chain:2")  # no corpus match; lookup: 5 6 -> 5 -> 6
    assert draft.tokens == [5, 6] and draft.sources == ["prompt-lookup"] * 2
    assert propose(merged, [1, 2], "chain:2").tokens == []  # nobody: a plain step
    with pytest.raises(ValueError, match="appears twice"):
        MergedDrafter([PromptLookupDrafter(), PromptLookupDrafter()])


def test_draft_values_name_their_sources():
    assert parse_draft("lookup+recycle") == FreeDraft(("prompt-lookup", "recycle"))
    corpus = parse_draft("corpus:docs/+lookup")
    assert corpus == FreeDraft(("corpus", "prompt-lookup"), Path("docs/"))
    assert str(corpus) == "corpus:docs+prompt-lookup"
    assert parse_draft("recycle") == FreeDraft(("recycle",))
    assert not isinstance(parse_draft("self:exit=4"), FreeDraft)
    assert parse_draft("models/draft-0.5b") == DraftModel("models/draft-0.5b")
    with pytest.raises(CompileOptionError, match="'self:exit=4' is not a free drafter"):
        parse_draft("lookup+self:exit=4")
    with pytest.raises(CompileOptionError, match="names a source twice"):
        parse_draft("lookup+prompt-lookup")
    with pytest.raises(CompileOptionError, match="--draft foo\\+bar: '\\+' combines free drafters"):
        parse_draft("foo+bar")


def test_lookups_report_how_long_their_match_is():
    lookup = PromptLookupDrafter()
    context = [9, 1, 2, 3, 4, 5, 6, 8, 7, 1, 2, 3, 4, 5, 6]  # "1 2 3 4 5 6" came before, then 8
    lookup.prepare(context)
    assert lookup.candidates(context, [], 1) == [8] and lookup.matched == 6
    assert lookup.candidates(context, [8], 1) == [7] and lookup.matched == 7
    corpus = CorpusDrafter(CorpusIndex.build([[1, 2, 3, 4, 5]]))
    corpus.prepare([0, 2, 3])
    assert corpus.candidates([0, 2, 3], [], 1) == [4] and corpus.matched == 2
    assert corpus.candidates([0, 2, 3], [4], 1) == [5] and corpus.matched == 3
    merged = MergedDrafter([corpus])
    assert propose(merged, [0, 2, 3], "chain:2").evidence == [2, 3]


def test_a_token_two_sources_propose_is_one_node_that_outranks_either_alone():
    context = [1, 2, 3, 9, 1, 2, 3]  # lookup: 9 (3 tokens matched); recycling after 3: 4, then 9
    agreeing = MergedDrafter([recycling_with({3: [4, 9]}), PromptLookupDrafter()])
    draft = propose(agreeing, context, "k-ary:2x1")  # untried: 1/2 each; 9: 1 - 1/2 * 1/2 = 3/4
    assert draft.tokens == [9, 4] and draft.sources == ["prompt-lookup", "recycle"]
    assert draft.seconded == [(("recycle", 0, 1),), ()]
    alone = MergedDrafter([recycling_with({3: [4, 9]}), PromptLookupDrafter()], agreement=False)
    draft = propose(alone, context, "k-ary:2x1")  # a tie at 1/2: the first-ranked source's rank 0
    assert draft.tokens == [4, 9] and draft.seconded == [(), ()]
