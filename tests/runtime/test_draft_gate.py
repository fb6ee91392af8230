"""The free drafters' per-step gate: keep the likeliest subtree that pays for its verify cost."""

from __future__ import annotations

import pytest

from skiptree.runtime.draft_gate import (
    ANY,
    RankAcceptance,
    VerifyCost,
    evidence_class,
    gate_draft,
    node_probabilities,
)
from skiptree.runtime.drafters import Draft


def draft_of(tokens, parents, source="recycle", evidence=None) -> Draft:
    draft = Draft()
    for node, (token, parent) in enumerate(zip(tokens, parents, strict=True)):
        draft.add(token, parent, source, evidence[node] if evidence else 0)
    return draft


def test_verify_cost_interpolates_and_extends_linearly():
    cost = VerifyCost((1, 2, 4), (1.1, 1.2, 1.6))
    assert cost(0) == 1.0 and cost(1) == pytest.approx(1.1) and cost(3) == pytest.approx(1.4)
    assert cost(6) == pytest.approx(2.0)  # slope 0.2 per node past the last measurement
    assert VerifyCost.from_json(None) is None
    assert VerifyCost.from_json({"nodes": [1], "ratio": [1.5], "prefix": 4}) == VerifyCost((1,), (1.5,))


def test_paired_cost_charges_the_padded_plain_step_and_gives_its_pad_slot_away():
    cost = VerifyCost((1, 2, 4), (1.02, 1.3, 1.5), paired=True)  # T(0) measured padded to two rows
    assert cost(0) == cost(1) == 1.0  # a plain step is already two rows: one node rides free
    assert cost(2) == pytest.approx(1.3) and cost(3) == pytest.approx(1.4)  # unpadded: as measured
    assert cost(6) == pytest.approx(1.7)  # past the end: 0.1 a node
    entry = {"nodes": [1, 3], "ratio": [1.0, 1.2], "paired": True}
    assert VerifyCost.from_json(entry) == VerifyCost((1, 3), (1.0, 1.2), True)
    acceptance = RankAcceptance()
    for _ in range(8):  # rank 0 never accepted: p = 0.1, no node pays for itself
        acceptance.record(draft_of([7], [-1]), verified=1, accepted=[])
    draft = draft_of([7, 8], [-1, 0])
    assert gate_draft(draft, acceptance, VerifyCost((1, 3), (1.2, 1.3))).tokens == []
    assert gate_draft(draft, acceptance, VerifyCost((1, 3), (1.2, 1.3), paired=True)).tokens == [7]


def test_only_nodes_whose_parent_was_accepted_are_judged():
    acceptance = RankAcceptance()
    draft = draft_of([7, 8, 9, 10], [-1, -1, 0, 1])  # 7 and 8 under the root; 9 under 7; 10 under 8
    assert draft.ranks == [0, 1, 0, 0]  # by default a node's rank among its siblings
    acceptance.record(draft, verified=4, accepted=[1, 3])  # 7, then 9
    judged = {("recycle", 0, 0): 2, ("recycle", 0, 1): 1}  # 7, 9; 8 (rank 1); not 10
    assert acceptance.judged == {**judged, ("recycle", ANY, 0): 2, ("recycle", ANY, 1): 1}
    assert acceptance.accepted[("recycle", 0, 0)] == 2 and acceptance.accepted[("recycle", 0, 1)] == 0
    assert acceptance.rate("recycle", 0) == pytest.approx(3 / 4) and acceptance.rate("corpus", 0) == 0.5


def test_long_matches_earn_their_own_acceptance():
    acceptance = RankAcceptance()
    for _ in range(6):  # 8+-token matches accepted, 2-token ones not
        acceptance.record(draft_of([7], [-1], "corpus", [12]), verified=1, accepted=[1])
        acceptance.record(draft_of([7], [-1], "corpus", [2]), verified=1, accepted=[])
    assert evidence_class(12) == 8 and evidence_class(5) == 4 and evidence_class(1) == 0
    assert acceptance.rate("corpus", 0, 9) == pytest.approx(7 / 8)
    assert acceptance.rate("corpus", 0, 2) == pytest.approx(1 / 8)
    assert acceptance.rate("corpus", 0) == pytest.approx(7 / 14)  # over all classes: ranks the sources
    cost = VerifyCost((1,), (1.3,))  # one node pays when p > 0.3
    assert gate_draft(draft_of([5], [-1], "corpus", [10]), acceptance, cost).evidence == [10]  # 7/8
    assert gate_draft(draft_of([4], [-1], "corpus", [2]), acceptance, cost).tokens == []  # 1/8


def test_the_gate_keeps_the_subtree_that_pays():
    acceptance = RankAcceptance()
    for _ in range(8):  # rank 0 accepted every time, rank 1 never
        acceptance.record(draft_of([7, 8], [-1, -1]), verified=2, accepted=[1])
    draft = draft_of([7, 8, 9, 10], [-1, -1, 0, 0])
    probabilities = node_probabilities(draft, acceptance)
    assert probabilities == pytest.approx([0.9, 0.1, 0.81, 0.09])
    flat = VerifyCost((1, 4), (1.0, 1.0))  # free verification: everything
    assert gate_draft(draft, acceptance, flat).tokens == [7, 8, 9, 10]
    linear = VerifyCost((1, 4), (1.2, 1.8))  # 0.2 a node: only 7 and 9 pay (1 + 0.9 + 0.81) / 1.4
    kept = gate_draft(draft, acceptance, linear)
    assert kept.tokens == [7, 9] and kept.parents == [-1, 0] and kept.sources == ["recycle"] * 2
    steep = VerifyCost((1,), (2.0,))  # a plain step is best
    assert gate_draft(draft, acceptance, steep).tokens == []


def test_sources_that_agree_make_a_token_likelier_and_each_learns_from_it():
    acceptance = RankAcceptance()
    for _ in range(2):  # recycling's first guess rejected twice: 1/4
        acceptance.record(draft_of([7], [-1]), verified=1, accepted=[])
    agreed = Draft()
    agreed.add(7, -1, "recycle", 0, 0, seconded=(("prompt-lookup", 4, 0),))  # lookup matched 4: 1/2
    assert node_probabilities(draft_of([7], [-1]), acceptance) == pytest.approx([1 / 4])
    assert node_probabilities(agreed, acceptance) == pytest.approx([1 - (3 / 4) * (1 / 2)])  # noisy-or
    cost = VerifyCost((1,), (1.5,))  # one node pays when p > 0.5
    assert gate_draft(draft_of([7], [-1]), acceptance, cost).tokens == []
    kept = gate_draft(agreed, acceptance, cost)
    assert kept.tokens == [7] and kept.seconded == [(("prompt-lookup", 4, 0),)]
    acceptance.record(agreed, verified=1, accepted=[1])  # both proposals judged, both accepted
    assert acceptance.rate("recycle", 0) == pytest.approx(2 / 5)
    assert acceptance.rate("prompt-lookup", 0, 4) == pytest.approx(2 / 3)
