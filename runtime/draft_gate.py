"""The per-step gate of free drafters: verify only the part of a draft that is predicted to pay.

A free drafter proposes whatever its tables hold, right or wrong, and on a CPU every verified node
costs (the verify step grows with its token count). Each step, the gate estimates how likely every
draft node is to be accepted and keeps the n most likely nodes (a tree: a child is never likelier
than its parent) that maximise the predicted speed of the step,

    (1 + sum of the n nodes' acceptance probabilities) / (T(n) / T(0)),

where T(n) is the verify step's measured cost with n draft nodes (`VerifyCost`, measured at compile
time on the compiling machine) and T(0) a plain step. n = 0 (a plain step) when nothing pays.

A node's probability is its parent's times the acceptance rate of its source at its rank among that
source's candidates there and at its evidence (how many tokens a lookup matched: 0-1, 2, 3, 4-7, 8+),
given that its parent was accepted (`RankAcceptance`, counted online from every verify step,
Laplace-smoothed so an untried class starts at 1/2). This is Sequoia's acceptance by rank, per
source and match length and measured as decoding goes; the tree shape the tuner chose bounds the draft.

A token that several sources propose at a node (prompt lookup and recycling agreeing, say) is
likelier than either alone: its rate given the parent is the noisy-or of the proposing sources'
rates, 1 - prod(1 - rate), and every proposing source's count learns from it. Why: with every node
of a large tree verified, a guess that a second source seconds is accepted far more often than the
same guess alone (bench/results/README.md, "Agreement between sources"). The effect on tokens a
step and speed, with and without agreement (the `no-agreement` engine of bench/free_drafters.py):
bench/results/free_drafters_qwen2.5-coder-1.5b_answers1024x64_code-copying_agreement.md and
bench/results/free_drafters_smollm2-135m_answers2433_agreement.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from skiptree.runtime.drafters import Draft, Proposal


@dataclass(frozen=True)
class VerifyCost:
    """T(n) / T(0) by draft nodes n, measured; interpolated between, extended linearly past the end.
    `paired`: a one-row call is padded to two rows (int8 activations: `pad_lone_rows`), so T(0),
    the plain step, is a two-row call and one draft node rides in its pad slot for free."""

    nodes: tuple[int, ...]
    ratio: tuple[float, ...]
    paired: bool = False

    @classmethod
    def from_json(cls, entry: dict | None) -> VerifyCost | None:
        if not entry:
            return None
        return cls(tuple(entry["nodes"]), tuple(entry["ratio"]), bool(entry.get("paired", False)))

    def __call__(self, nodes: int) -> float:
        if self.paired and nodes == 1:
            return 1.0  # root + one node: the same two-row call as a plain step
        xs, ys = (0, *self.nodes), (1.0, *self.ratio)
        if nodes <= xs[-1]:
            return float(np.interp(nodes, xs, ys))
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (nodes - xs[-1])


def evidence_class(evidence: int) -> int:
    """Match lengths grouped: 0 (none or 1 token), 2, 3, 4 (4-7), 8 (8 and more)."""
    return 0 if evidence < 2 else evidence if evidence < 4 else 4 if evidence < 8 else 8


ANY = -1  # the evidence class of a source's counts over all classes (for ranking the sources)


@dataclass
class RankAcceptance:
    """P(accepted | parent accepted) by (source, evidence class, rank among its candidates), counted
    online; also over all classes (class ANY)."""

    judged: dict[tuple[str, int, int], int] = field(default_factory=dict)
    accepted: dict[tuple[str, int, int], int] = field(default_factory=dict)

    def rate(self, source: str, rank: int, evidence: int = ANY) -> float:
        key = (source, evidence if evidence == ANY else evidence_class(evidence), rank)
        return (self.accepted.get(key, 0) + 1) / (self.judged.get(key, 0) + 2)

    def record(self, draft: Draft, verified: int, accepted: list[int]) -> None:
        """The first `verified` nodes of `draft` were verified; `accepted` (verify numbering, 1 = draft
        node 0) were accepted. A node was judged when its parent was the root or accepted."""
        taken = {node - 1 for node in accepted}
        for node in range(min(verified, len(draft.tokens))):
            parent = draft.parents[node]
            if parent != -1 and parent not in taken:
                continue
            for source, evidence, rank in proposals(draft, node):
                for key in ((source, evidence_class(evidence), rank), (source, ANY, rank)):
                    self.judged[key] = self.judged.get(key, 0) + 1
                    self.accepted[key] = self.accepted.get(key, 0) + (node in taken)


def proposals(draft: Draft, node: int) -> list[Proposal]:
    """(source, evidence, rank) of every source that proposed the node's token, its own first."""
    own = (draft.sources[node], draft.evidence[node], draft.ranks[node])
    return [own, *draft.seconded[node]]


def agreed_rate(acceptance: RankAcceptance, proposed: list[Proposal]) -> float:
    """P(accepted | parent accepted) of a token proposed by these sources: their rates' noisy-or."""
    missed = 1.0
    for source, evidence, rank in proposed:
        missed *= 1.0 - acceptance.rate(source, rank, evidence)
    return 1.0 - missed


def node_probabilities(draft: Draft, acceptance: RankAcceptance) -> list[float]:
    probabilities: list[float] = []
    for node, parent in enumerate(draft.parents):
        above = 1.0 if parent == -1 else probabilities[parent]
        probabilities.append(above * agreed_rate(acceptance, proposals(draft, node)))
    return probabilities


def gate_draft(draft: Draft, acceptance: RankAcceptance, cost: VerifyCost) -> Draft:
    """The subtree of `draft` with the best predicted speed (see the module doc); empty: plain step."""
    if not draft.tokens:
        return draft
    probabilities = node_probabilities(draft, acceptance)
    order = sorted(range(len(probabilities)), key=lambda node: (-probabilities[node], node))
    gains = 1.0 + np.cumsum([probabilities[node] for node in order])
    speeds = [1.0] + [gain / cost(n) for n, gain in enumerate(gains, start=1)]
    best = int(np.argmax(speeds))
    kept = sorted(order[:best])  # parents before children: a parent is at least as likely
    renumber = {old: new for new, old in enumerate(kept)}
    gated = Draft()
    for old in kept:
        parent = renumber.get(draft.parents[old], -1)
        gated.add(draft.tokens[old], parent, draft.sources[old], draft.evidence[old], draft.ranks[old],
                  draft.seconded[old])  # fmt: skip
    return gated
