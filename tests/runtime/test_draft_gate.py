"""The free drafters' per-step gate: keep the likeliest subtree that pays for its verify cost."""

from __future__ import annotations

import pytest

from skiptree.runtime.draft_gate import (
    RankAcceptance,
    VerifyCost,
    gate_draft,
    node_probabilities,
    sibling_ranks,
)
from skiptree.runtime.drafters import Draft


def draft_of(tokens, parents, source="recycle") -> Draft:
    draft = Draft()
    for token, parent in zip(tokens, parents, strict=True):
        draft.add(token, parent, source)
    return draft


def test_verify_cost_interpolates_and_extends_linearly():
    cost = VerifyCost((1, 2, 4), (1.1, 1.2, 1.6))
    assert cost(0) == 1.0 and cost(1) == pytest.approx(1.1) and cost(3) == pytest.approx(1.4)
    assert cost(6) == pytest.approx(2.0)  # slope 0.2 per node past the last measurement
    assert VerifyCost.from_json(None) is None
    assert VerifyCost.from_json({"nodes": [1], "ratio": [1.5], "prefix": 4}) == VerifyCost((1,), (1.5,))


def test_only_nodes_whose_parent_was_accepted_are_judged():
    acceptance = RankAcceptance()
    draft = draft_of([7, 8, 9, 10], [-1, -1, 0, 1])  # 7 and 8 under the root; 9 under 7; 10 under 8
    assert sibling_ranks(draft.parents) == [0, 1, 0, 0]
    acceptance.record(draft, verified=4, accepted=[1, 3])  # 7, then 9
    assert acceptance.judged == {("recycle", 0): 2, ("recycle", 1): 1}  # 7, 9; 8 (rank 1); not 10
    assert acceptance.accepted == {("recycle", 0): 2, ("recycle", 1): 0}
    assert acceptance.rate("recycle", 0) == pytest.approx(3 / 4) and acceptance.rate("corpus", 0) == 0.5


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
