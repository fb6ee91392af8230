"""The feature-head drafter at run time (EAGLE-3; see models/feature_head.py and
passes/insert_feature_head.py).

The decoder hands it the target's features (the verify graph's `features` output: an EAGLE-3 head's
fused low, middle and last streams u, fused in the target's own pass; an EAGLE-1 head's last-layer
stream) for every token the target caches: the prompt at prefill, then the root and the accepted
nodes after each step (`observe`). Per step it first catches its own one-layer cache up with the
pairs (f_{p-1}, x_p) for the positions p cached since last time, the root's pair last; the root's
predicted features and logits give the root's children. Deeper levels run on predicted features,
one graph call per tree level. Pair p sits in slot p - 1; tree node j in slot L + j (L = the
target's cached length), which the next catch-up overwrites.
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.drafters import Draft, grow_tree
from skiptree.runtime.onnx_step import OnnxGraph
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.self_draft import causal_rows_bias
from skiptree.runtime.tree import TreeShape, tree_bias


class FeatureDrafter:
    name = "feature-head"
    wants_features = True  # the decoder fetches the verify graph's `features` and calls `observe`

    def __init__(self, graph: OnnxGraph, hidden_size: int):
        self.graph = graph  # bound to the head's own one-layer KVCache
        self.max_seq_len = graph.cache.max_seq_len
        self.features = np.zeros((self.max_seq_len, hidden_size), dtype=graph.cache.dtype)
        self.length = 0  # target features known for positions 0..length-1
        self.head_length = 0  # head cache slots 0..head_length-1 hold the pairs of positions 1..head_length

    def observe(self, features: np.ndarray, reset: bool = False) -> None:
        """The target's features [n, H] of the next n cached positions (`reset`: a new sequence)."""
        if reset:
            self.length = self.head_length = 0
        self.features[self.length : self.length + len(features)] = features
        self.length += len(features)

    def run_pairs(self, features: np.ndarray, tokens: list[int], positions: np.ndarray, bias: np.ndarray,
             slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        inputs = {"features": features[None], "input_ids": np.asarray([tokens], dtype=np.int64),
                  "positions": np.asarray(positions, dtype=np.int64)[None], "attn_bias": bias,
                  "write_slots": np.asarray(slots, dtype=np.int64)}  # fmt: skip
        logits, predicted = self.graph.run(inputs, ("logits", "next_features"))
        return logits[0], predicted[0]

    def propose(self, context: list[int], shape: TreeShape, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:  # fmt: skip
        cached = len(context) - 1  # the target's cached tokens; the root is context[-1]
        if self.length != cached or cached < 1:  # not fed by the decoder (or nothing cached): no draft
            return Draft()
        start = min(self.head_length, cached - 1)
        positions = np.arange(start + 1, cached + 1)
        slots = positions - 1
        dtype = self.graph.cache.dtype
        bias = causal_rows_bias(start, len(slots), self.max_seq_len, dtype)
        logits, predicted = self.run_pairs(self.features[slots], context[start + 1 :], positions, bias, slots)
        self.head_length = cached
        node_features = {-1: predicted[-1]}  # draft node -> its predicted features (-1: the root)

        def run_level(draft: Draft, rows: list[int], depth: int) -> np.ndarray:
            level_bias = tree_bias(draft.parents, cached, cached, rows, self.max_seq_len, dtype)
            parent_features = np.stack([node_features[draft.parents[r]] for r in rows])
            level_logits, level_features = self.run_pairs(parent_features, [draft.tokens[r] for r in rows],
                                                     np.full(len(rows), cached + depth), level_bias,
                                                     np.asarray(rows) + cached)  # fmt: skip
            node_features.update(zip(rows, level_features, strict=True))
            return level_logits

        return grow_tree(shape, logits[-1], run_level, sampling, rng, self.max_seq_len - cached)
