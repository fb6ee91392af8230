"""The feature head as one source of a merged draft tree (`--draft feature-head:W+lookup+recycle`).

Each step the head grows its own tree (greedy: its top candidates per node, shaped like the
artifact's tree, one head call per level) when the merged drafter prepares its sources; the merged
tree then reads the head's children of any path like a free drafter's candidates, ranked against
prompt lookup's and recycling's by the acceptance measured for each (source, rank, depth). The
evidence the head reports is the node's depth, so its deeper, less certain guesses are judged apart.
Its draft is deterministic (greedy) even when decoding samples, as the free drafters' are.
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.feature_draft import FeatureDrafter
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import TreeShape

GREEDY = SamplingConfig()


class HeadCandidates:
    """A `CandidateSource` over the feature head's own tree of this step."""

    name = "feature-head"
    wants_features = True  # the decoder hands the target's features on (through the merged drafter)

    def __init__(self, drafter: FeatureDrafter, shape: TreeShape):
        self.drafter, self.shape = drafter, shape
        self.matched = 0
        self.children: dict[tuple[int, ...], list[int]] = {}
        self.rng = np.random.default_rng(0)  # unused by greedy drafting; grow_tree takes one

    def observe(self, features: np.ndarray, reset: bool = False) -> None:
        self.drafter.observe(features, reset)

    def prepare(self, context: list[int]) -> None:
        draft = self.drafter.propose(context, self.shape, GREEDY, self.rng)
        paths: dict[int, tuple[int, ...]] = {-1: ()}
        self.children = {}
        for node, (token, parent) in enumerate(zip(draft.tokens, draft.parents, strict=True)):
            paths[node] = (*paths[parent], token)
            self.children.setdefault(paths[parent], []).append(token)  # best first, as the head ranked them

    def candidates(self, context: list[int], path: list[int], limit: int) -> list[int]:
        self.matched = len(path) + 1  # the depth of the proposed children
        return self.children.get(tuple(path), [])[:limit]
