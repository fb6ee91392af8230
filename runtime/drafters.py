"""Drafters: who proposes the tokens of the draft tree. Each fills a static `TreeShape`.

A `Draft` lists the proposed nodes (draft numbering, parents before children, children in rank
order) and, per verify node (0 = root, i + 1 = draft node i), the distribution its children were
drawn from (None: proposed deterministically). Nodes a drafter has nothing for are left out with
their subtrees: the verify step is never padded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from skiptree.runtime.onnx_step import OnnxStepModel
from skiptree.runtime.sampling import SamplingConfig, sampling_probabilities
from skiptree.runtime.tree import TreeShape, tree_bias

Proposal = tuple[str, int, int]  # (source, evidence, rank) of one source's proposal of a token


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # -1 = root
    child_probs: list[np.ndarray | None] = field(default_factory=lambda: [None])  # per verify node
    hidden: np.ndarray | None = None  # [1 + n, H]: a prefix-exit self-draft's states, root first
    sources: list[str] = field(default_factory=list)  # per node: which source proposed it ([]: the drafter)
    evidence: list[int] = field(default_factory=list)  # per node: the tokens its source matched (lookups)
    ranks: list[int] = field(default_factory=list)  # per node: its rank among its source's candidates there
    # per node: (source, evidence, rank) of every other source that proposed the same token there
    seconded: list[tuple[Proposal, ...]] = field(default_factory=list)

    def add(self, token: int, parent: int, source: str | None = None, evidence: int = 0,
            rank: int | None = None, seconded: tuple[Proposal, ...] = ()) -> int:
        """Append a node; `rank` defaults to its rank among the parent's children so far."""
        self.ranks.append(self.parents.count(parent) if rank is None else rank)
        self.seconded.append(seconded)
        self.tokens.append(token)
        self.parents.append(parent)
        self.child_probs.append(None)
        if source is not None:
            self.sources.append(source)
            self.evidence.append(evidence)
        return len(self.tokens) - 1


class Drafter(Protocol):
    name: str

    def propose(self, context: list[int], shape: TreeShape, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft: ...  # fmt: skip


Candidates = Callable[[list[int], int], list[tuple[int, str, int, int, tuple[Proposal, ...]]]]


def fill_tree(shape: TreeShape, candidates: Candidates) -> Draft:
    """A deterministic draft shaped like `shape`: `candidates(path, limit)` gives at most `limit`
    (token, source, evidence, rank, seconded) children, best first, of the node reached by `path`
    (the tokens below the root; `seconded`: the other sources' proposals of the same token). A node
    with fewer candidates than the shape's children drops the rest with their subtrees."""
    draft, kept = Draft(), {-1: -1}  # shape node -> draft node
    paths: dict[int, list[int]] = {-1: []}
    for parent, kids in shape.children().items():  # parents before children (BFS order)
        if parent not in kept:
            continue  # dropped with its subtree
        for node, (token, source, evidence, rank, seconded) in zip(kids, candidates(paths[parent], len(kids)),
                                                                   strict=False):  # fmt: skip
            kept[node] = draft.add(token, kept[parent], source, evidence, rank, seconded)
            paths[node] = paths[parent] + [token]
    return draft


class CandidateSource(Protocol):
    """A drafter that proposes children node by node (prompt lookup, recycling, corpus lookup).
    `matched`: after `candidates`, how many tokens of context + path its proposals rest on (a
    lookup's match length; 0 when that means nothing), so the gate can trust long matches more."""

    name: str
    matched: int

    def prepare(self, context: list[int]) -> None: ...
    def candidates(self, context: list[int], path: list[int], limit: int) -> list[int]: ...


def draft_from(source: CandidateSource, context: list[int], shape: TreeShape) -> Draft:
    """The tree `source` proposes after `context` (its last token is the root)."""
    source.prepare(context)
    def candidates(path: list[int], limit: int) -> list[tuple[int, str, int, int, tuple[Proposal, ...]]]:
        tokens = source.candidates(context, path, limit)
        return [(token, source.name, source.matched, rank, ()) for rank, token in enumerate(tokens)]

    return fill_tree(shape, candidates)


class PromptLookupDrafter:
    """Prompt lookup: continue the context the way it continued after earlier occurrences of its
    last n tokens (n from `max_ngram` down to `min_ngram`), most recent occurrence first."""

    name = "prompt-lookup"
    matched = 0

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.context: list[int] = []
        self.index: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions of the next token

    def prepare(self, context: list[int]) -> None:
        """Index the context's new tokens (a new sequence: start over)."""
        if context[: len(self.context)] != self.context:  # a new sequence: rebuild
            self.context, self.index = [], {}
        for position in range(len(self.context), len(context)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if position >= n:
                    self.index.setdefault(tuple(context[position - n : position]), []).append(position)
        self.context = list(context)

    def candidates(self, context: list[int], path: list[int], limit: int) -> list[int]:
        """Distinct next tokens after earlier occurrences of the suffix of context + path, best first.
        `matched`: how far (up to 16 tokens) the best candidate's occurrence matches back."""
        sequence = context[-self.max_ngram :] + path
        found: list[int] = []
        self.matched = 0
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            for position in reversed(self.index.get(tuple(sequence[-n:]), ())):
                token = self.context[position]
                if not found:
                    self.matched = self._match_length(context, path, position)
                if token not in found:
                    found.append(token)
                    if len(found) == limit:
                        return found
        return found

    def _match_length(self, context: list[int], path: list[int], position: int, cap: int = 16) -> int:
        """Tokens of context + path, from the end, equal to those before `position` (at most `cap`)."""
        length = 0
        while length < min(cap, position, len(context) + len(path)):
            back = length + 1
            ours = path[-back] if back <= len(path) else context[-(back - len(path))]
            if self.context[position - back] != ours:
                break
            length += 1
        return length

    def propose(self, context, shape, sampling, rng) -> Draft:
        return draft_from(self, context, shape)


def common_prefix(first: list[int], second: list[int], limit: int) -> int:
    """Length of the longest common prefix of two sequences, at most `limit`."""
    length = 0
    while length < limit and length < len(first) and length < len(second) and first[length] == second[length]:
        length += 1
    return length


def children_tokens(logits: np.ndarray, count: int, sampling: SamplingConfig, rng: np.random.Generator
                    ) -> tuple[list[int], np.ndarray | None]:  # fmt: skip
    """A node's children from its draft logits: greedy takes the top `count` tokens, sampling draws
    `count` without replacement from q (returned, the verifier needs it)."""
    if not sampling.do_sample:
        return [int(t) for t in np.argsort(-logits, kind="stable")[:count]], None
    q = sampling_probabilities(logits, sampling)
    count = min(count, int((q > 0).sum()))
    return [int(t) for t in rng.choice(q.shape[0], size=count, replace=False, p=q)], q


def grow_tree(shape: TreeShape, root_logits: np.ndarray,
              run_level: Callable[[Draft, list[int], int], np.ndarray], sampling: SamplingConfig,
              rng: np.random.Generator, room: int) -> Draft:  # fmt: skip
    """Draft a tree level by level: the root's children from `root_logits`, then `run_level(draft,
    rows, depth)` gives the draft logits of nodes `rows` (draft numbering) at `depth` (1 = the
    root's children), whose children come next. Nodes numbered `room` or more are not expanded."""
    children, draft = shape.children(), Draft()
    tokens, q = children_tokens(root_logits, len(children[-1]), sampling, rng)
    draft.child_probs[0] = q
    frontier = [(node, draft.add(token, -1)) for node, token in zip(children[-1], tokens, strict=False)]
    depth = 1
    while frontier:
        expand = [(node, ours) for node, ours in frontier if children[node] and ours < room]
        if not expand:
            break
        logits = run_level(draft, [ours for _, ours in expand], depth)
        frontier = []
        for (node, ours), row_logits in zip(expand, logits, strict=True):
            tokens, q = children_tokens(row_logits, len(children[node]), sampling, rng)
            draft.child_probs[ours + 1] = q
            kids = zip(children[node], tokens, strict=False)
            frontier += [(kid, draft.add(token, ours)) for kid, token in kids]
        depth += 1
    return draft


class DraftModelDrafter:
    """A small model with the same tokenizer drafts the tree level by level on its own KV cache:
    greedy takes the top-W tokens per node, sampling draws W without replacement from q."""

    name = "draft-model"

    def __init__(self, model: OnnxStepModel):
        self.model = model
        self.cached: list[int] = []  # the tokens whose K/V the draft cache holds in slots 0..

    def propose(self, context, shape, sampling, rng) -> Draft:
        cache, model = self.model.cache, self.model
        # Reuse the cached prefix the context shares (a new prompt shares little or nothing); the
        # draft's scratch tree slots from the last step are dropped with the rest.
        start = common_prefix(self.cached, context, min(cache.length, len(context) - 1))
        cache.length = start
        root_logits = model.forward(context[start:], ("logits",))[0][-1]  # catch up, ending at the root
        self.cached = list(context)
        first_slot = len(context)  # draft node j lives at slot first_slot + j

        def run_level(draft: Draft, rows: list[int], depth: int) -> np.ndarray:
            bias = tree_bias(draft.parents, first_slot, first_slot, rows, model.max_seq_len, cache.dtype)
            tokens, positions = [draft.tokens[r] for r in rows], np.full(len(rows), first_slot - 1 + depth)
            return model.run_tokens(tokens, positions, bias, np.asarray(rows) + first_slot, ("logits",))[0]

        return grow_tree(shape, root_logits, run_level, sampling, rng, model.max_seq_len - first_slot)
