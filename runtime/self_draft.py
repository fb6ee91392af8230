"""Self-drafts at run time: the target drafts with some of its own layers (see passes/skip_layers.py).

The "self_draft" graph binds the target's cache buffers of the layers it runs, so it needs no cache
of its own and never catches up: the verified prefix is already there. Drafts are chains (one token
per level, the first child of each level of the tree shape); draft node j is written at slot
L + j, exactly where verification puts it, so a chain is never compacted.

Prefix exit (self:exit=E): the draft's K/V of layers < E are the target's, and it returns the
residual stream after layer E-1; verification ("verify" with a `hidden` input) runs layers E..L-1
only. The last draft token needs one more draft pass for its hidden state (its head output is
unused). A plain step is the two halves in a row: `SplitStepModel`.
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.drafters import Draft
from skiptree.runtime.onnx_step import BATCHED, CachedSteps, OnnxGraph
from skiptree.runtime.sampling import SamplingConfig, sampling_probabilities
from skiptree.runtime.tree import TreeShape


def causal_rows_bias(first_slot: int, steps: int, max_seq_len: int, dtype: np.dtype) -> np.ndarray:
    """[1, 1, T, S]: the token at slot first_slot + t sees slots 0..first_slot + t."""
    rows = first_slot + np.arange(steps)[:, None]
    allowed = np.arange(max_seq_len)[None, :] <= rows
    return np.where(allowed, 0.0, np.finfo(dtype).min).astype(dtype)[None, None]


def run_draft_graph(graph: OnnxGraph, tokens: list[int], first_slot: int,
                    outputs: tuple[str, ...]) -> list[np.ndarray]:  # fmt: skip
    """The self-draft graph on tokens at slots (= positions) first_slot.., causally; batch dim dropped."""
    cache = graph.cache
    slots = np.arange(first_slot, first_slot + len(tokens), dtype=np.int64)
    inputs = {"input_ids": np.asarray([tokens], dtype=np.int64), "positions": slots[None],
              "attn_bias": causal_rows_bias(first_slot, len(tokens), cache.max_seq_len, cache.dtype),
              "write_slots": slots}  # fmt: skip
    return [value[0] for value in graph.run(inputs, outputs)]


class SplitStepModel(CachedSteps):
    """The full step of a prefix-exit artifact: the self-draft graph (layers < E, writes their K/V,
    returns hidden states), then the verify graph from layer E over the same tokens as a chain."""

    def __init__(self, draft: OnnxGraph, verify: OnnxGraph, max_tree: int):
        self.draft_graph, self.graph, self.max_tree = draft, verify, max_tree
        self.cache = verify.cache
        self.max_seq_len = self.cache.max_seq_len

    def forward(self, token_ids: list[int], outputs: tuple[str, ...] = ("logits", "next_ids")) -> list:
        self.check_room(len(token_ids))
        pieces: list[list[np.ndarray]] = []
        for start in range(0, len(token_ids), self.max_tree):
            chunk = token_ids[start : start + self.max_tree]
            hidden = run_draft_graph(self.draft_graph, chunk, self.cache.length, ("hidden",))[0]
            inputs = {"hidden": hidden[None], "parents": np.maximum(np.arange(len(chunk)) - 1, 0),
                      "prefix_len": np.asarray([self.cache.length], dtype=np.int64)}  # fmt: skip
            named = zip(outputs, self.graph.run(inputs, outputs), strict=True)
            pieces.append([value[0] if name in BATCHED else value for name, value in named])
            self.cache.length += len(chunk)
        return [np.concatenate([piece[i] for piece in pieces]) for i in range(len(outputs))]


class SelfDrafter:
    """Drafts a chain with the target's own "self_draft" graph on the target's cache."""

    name = "self"

    def __init__(self, graph: OnnxGraph, exit_kind: bool):
        self.graph, self.exit_kind = graph, exit_kind

    def propose(self, context: list[int], shape: TreeShape, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:  # fmt: skip
        cache = self.graph.cache
        start = cache.length  # the root, context[-1], goes to this slot
        extra = 1 if self.exit_kind else 0  # the last draft's own pass (for its hidden state)
        depth = max(0, min(shape.depth, cache.max_seq_len - start - 1 - extra))
        draft, hidden, token = Draft(), [], context[-1]
        outputs = ["logits" if sampling.do_sample else "next_ids"]
        if self.exit_kind:
            outputs.append("hidden")
        for level in range(depth):
            values = run_draft_graph(self.graph, [token], start + level, tuple(outputs))
            if sampling.do_sample:
                q = sampling_probabilities(values[0][-1], sampling)
                token = int(rng.choice(q.shape[0], p=q))
                draft.child_probs[level] = q
            else:
                token = int(values[0][-1])
            hidden.extend(values[1:])
            draft.add(token, level - 1)
        if self.exit_kind and depth:
            hidden.append(run_draft_graph(self.graph, [token], start + depth, ("hidden",))[0])
            draft.hidden = np.concatenate(hidden)  # [depth + 1, H]: root, then each draft token
        return draft
