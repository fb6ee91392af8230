"""Several free drafters as one: their proposals merged into one tree per step.

Every node's children are the sources' candidates in turn (duplicates once, under the first source
that proposed them), so each source is a branch where it has something to say and fills the
ranks another source leaves empty. Sources are ranked by their measured acceptance so far: the
share of the tokens each proposed that the target accepted (Laplace-smoothed, so an untried
source starts at 1/2); the tree's shape is the tuner's, from the merged drafter's acceptance by
rank and the verify cost T(n). Which source proposed each draft node is recorded, so a result can
say how many tokens each contributed.
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.drafters import CandidateSource, Draft, fill_tree
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import TreeShape


class MergedDrafter:
    """Prompt lookup, recycling and corpus lookup (any of them) proposing one tree together."""

    def __init__(self, sources: list[CandidateSource]):
        if len({source.name for source in sources}) != len(sources):
            raise ValueError(f"a source appears twice in {[source.name for source in sources]}")
        self.sources = list(sources)
        self.name = "+".join(source.name for source in sources)
        self.proposed = dict.fromkeys(self.by_name, 0)
        self.accepted = dict.fromkeys(self.by_name, 0)

    @property
    def by_name(self) -> dict[str, CandidateSource]:
        return {source.name: source for source in self.sources}

    @property
    def wants_logits(self) -> bool:
        return any(getattr(source, "wants_logits", False) for source in self.sources)

    def observe_logits(self, tokens: list[int], logits: np.ndarray) -> None:
        for source in self.sources:
            if getattr(source, "wants_logits", False):
                source.observe_logits(tokens, logits)

    def acceptance(self, name: str) -> float:
        """Share of the source's proposed tokens that were accepted, smoothed: (a + 1) / (p + 2)."""
        return (self.accepted[name] + 1) / (self.proposed[name] + 2)

    def ranked(self) -> list[CandidateSource]:
        """Sources best first (stable: ties keep the order they were given in)."""
        return sorted(self.sources, key=lambda source: -self.acceptance(source.name))

    def propose(self, context: list[int], shape: TreeShape, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:  # fmt: skip
        order = self.ranked()
        for source in order:
            source.prepare(context)

        def candidates(path: list[int], limit: int) -> list[tuple[int, str]]:
            merged: dict[int, str] = {}
            for source in order:
                for token in source.candidates(context, path, limit):
                    merged.setdefault(token, source.name)
                if len(merged) >= limit:
                    break
            return list(merged.items())[:limit]

        return fill_tree(shape, candidates)

    def observe_accepted(self, sources: list[str], accepted: list[int]) -> None:
        """After verification: the verified nodes' sources and the accepted ones (verify numbering,
        1 = draft node 0)."""
        for source in sources:
            self.proposed[source] += 1
        for node in accepted:
            self.accepted[sources[node - 1]] += 1
