"""Drafters merged into one tree per step, gated: free drafters (one, or several as one), and a
trained feature head's candidates among them (`skiptree.runtime.head_source`).

Every node's children are all sources' candidates ordered by their predicted acceptance: the
acceptance measured so far for that source, at that candidate's rank among the source's own
candidates there and at the source's evidence (how many tokens a lookup matched), given the parent
was accepted (`RankAcceptance`). A token proposed twice is one node, under its likelier proposal,
and as likely as its proposals' noisy-or (sources that agree: `skiptree.runtime.draft_gate`).
So a 12-token prompt-lookup match outranks recycling's guess, and recycling's first guess outranks a
lookup that matched one token, whatever the sources' average rates; ties go to the lower rank, then
to the source with the better measured acceptance overall (`ranked`). The tree's shape
(the tuner's, or --tree) bounds the draft; with a measured verify cost T(n) in the artifact, the
per-step gate (`skiptree.runtime.draft_gate`) then verifies only the part predicted to pay, or
nothing (a plain step). Which source proposed each draft node is recorded, so a result can say
how many tokens each contributed.
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.draft_gate import RankAcceptance, VerifyCost, agreed_rate, gate_draft
from skiptree.runtime.drafters import CandidateSource, Draft, Proposal, fill_tree
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import TreeShape

TABLE_SOURCES = ("prompt-lookup", "recycle", "corpus")  # free drafters: no weights, no graph


class MergedDrafter:
    """Prompt lookup, recycling and corpus lookup (any of them) proposing one tree together."""

    def __init__(self, sources: list[CandidateSource], cost: VerifyCost | None = None,
                 agreement: bool = True):  # fmt: skip
        """`cost`: the verify cost T(n) / T(0) that gates each step (None: verify whole drafts);
        `agreement`: a token several sources propose is as likely as their rates' noisy-or (False:
        as its likeliest proposal alone; kept for measuring what agreement gains)."""
        if len({source.name for source in sources}) != len(sources):
            raise ValueError(f"a source appears twice in {[source.name for source in sources]}")
        self.sources, self.cost, self.agreement = list(sources), cost, agreement
        self.name = "+".join(source.name for source in sources)
        self.acceptance = RankAcceptance()
        self.last = Draft()

    @property
    def by_name(self) -> dict[str, CandidateSource]:
        return {source.name: source for source in self.sources}

    @property
    def wants_logits(self) -> bool:
        return any(getattr(source, "wants_logits", False) for source in self.sources)

    @property
    def wants_features(self) -> bool:
        return any(getattr(source, "wants_features", False) for source in self.sources)

    def observe(self, features: np.ndarray, reset: bool = False) -> None:
        """The target's features of the next cached positions, for sources that draft on them."""
        for source in self.sources:
            if getattr(source, "wants_features", False):
                source.observe(features, reset)

    def observe_logits(self, tokens: list[int], logits: np.ndarray,
                       previous: list[int] | None = None) -> None:  # fmt: skip
        for source in self.sources:
            if getattr(source, "wants_logits", False):
                source.observe_logits(tokens, logits, previous)

    def ranked(self) -> list[CandidateSource]:
        """Sources best first by acceptance at rank 0 (stable: ties keep the order given)."""
        return sorted(self.sources, key=lambda source: -self.acceptance.rate(source.name, 0))

    def propose(self, context: list[int], shape: TreeShape, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:  # fmt: skip
        order = self.ranked()
        for source in order:
            source.prepare(context)

        def candidates(path: list[int], limit: int) -> list[tuple[int, str, int, int, tuple[Proposal, ...]]]:
            scored = []  # (-predicted acceptance, rank, source order, token, source, evidence)
            for position, source in enumerate(order):
                for rank, token in enumerate(source.candidates(context, path, limit)):
                    rate = self.acceptance.rate(source.name, rank, source.matched)
                    scored.append((-rate, rank, position, token, source.name, source.matched))
            by_token: dict[int, list[Proposal]] = {}  # likeliest proposal first
            for _, rank, _, token, name, evidence in sorted(scored):
                by_token.setdefault(token, []).append((name, evidence, rank))
            if not self.agreement:
                by_token = {token: found[:1] for token, found in by_token.items()}
            # children by their agreed rate (stable: ties keep the likeliest single proposal's order)
            best = sorted(by_token.items(), key=lambda item: -agreed_rate(self.acceptance, item[1]))
            return [(token, *found[0], tuple(found[1:])) for token, found in best[:limit]]

        draft = fill_tree(shape, candidates)
        self.last = draft if self.cost is None else gate_draft(draft, self.acceptance, self.cost)
        return self.last

    def observe_accepted(self, verified: int, accepted: list[int]) -> None:
        """After verifying the first `verified` nodes of the last draft: the accepted ones (verify
        numbering, 1 = draft node 0)."""
        self.acceptance.record(self.last, verified, accepted)
