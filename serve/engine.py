"""Continuous batching at step granularity over a batched verify graph (`skiptree serve`'s core).

Requests join and leave between steps. A step runs at most one prefill chunk (one request's row,
so a long prompt never stalls the others for more than a chunk) and then one verify call over the
rows of every decoding request: each its own tree (its drafts, or just its root) and its own cache
row. Decoding requests hold rows 0..k-1 (one contiguous block for the call); a request moves to
row k when its prefill ends, and the last decoding row moves into the row a finished request
frees. How many draft nodes each request verifies is decided for the whole step
(`skiptree.serve.budget`). Every request's greedy tokens equal its single-request decoding: each
row is computed as it would be alone, and greedy acceptance is exact whatever the tree.
Sampled requests decode with plain steps here, drawing from their own seeded generator, so a
seeded request gives the tokens `generate(..., speculative=False, seed=...)` gives.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from skiptree.runtime.batch_step import BatchRows
from skiptree.runtime.draft_gate import RankAcceptance, node_probabilities
from skiptree.runtime.drafters import CandidateSource, Draft
from skiptree.runtime.merged_draft import MergedDrafter
from skiptree.runtime.sampling import SamplingConfig, choose_token
from skiptree.runtime.tree import TreeShape
from skiptree.runtime.verify import accept_greedy, children_of
from skiptree.serve.budget import BatchCost, likeliest_first, plan_tokens


@dataclass
class Request:
    """One generation: its prompt, limits and callbacks (called on the engine's thread)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    eos_token_ids: frozenset[int] = frozenset()
    on_tokens: Callable[[list[int]], None] = lambda tokens: None
    on_finish: Callable[[str], None] = lambda reason: None  # "stop" (EOS), "length", "cancelled", "error"
    # state, owned by the engine
    tokens: list[int] = field(default_factory=list)
    row: int = -1
    prefilled: int = 0
    cancelled: bool = False
    finish_reason: str | None = None
    draft: Draft | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    target_steps: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.tokens

    def cancel(self) -> None:
        """Stop at the next step (a client that went away); its row is freed then."""
        self.cancelled = True


@dataclass
class StepStats:
    rows: int = 0
    tokens_per_row: int = 0
    emitted: int = 0
    prefill_tokens: int = 0
    seconds: float = 0.0


class BatchEngine:
    """Decodes many requests at once over `BatchRows`; `step()` does one scheduling step."""

    def __init__(self, rows: BatchRows, max_tree: int, sources: list[CandidateSource] | None = None,
                 shape: TreeShape | None = None, cost: BatchCost | None = None):  # fmt: skip
        """`max_tree`: the most tokens a row takes in one call (the prefill chunk too);
        `sources`/`shape`: the artifact's free drafters and tree (None: no speculation); `cost`: the
        measured batched verify cost (None: verify whole drafts)."""
        self.rows, self.prefill_chunk = rows, max_tree
        self.sources, self.shape, self.cost = sources or [], shape, cost
        self.acceptance = RankAcceptance()  # shared: every request's verify steps teach it
        self.max_tokens = min(shape.size + 1, max_tree) if self.speculative else 1
        self.waiting: deque[Request] = deque()
        self.slots: list[Request | None] = [None] * rows.rows
        self.decoding = 0  # requests in rows 0..decoding-1 decode; the rest of the occupied rows prefill
        self.last = StepStats()

    @property
    def speculative(self) -> bool:
        return bool(self.sources) and self.shape is not None

    @property
    def active(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def submit(self, request: Request) -> None:
        if len(request.prompt_ids) + request.max_new_tokens > self.rows.max_seq_len:
            raise ValueError(f"{len(request.prompt_ids)} prompt tokens + {request.max_new_tokens} new "
                             f"exceed the context of {self.rows.max_seq_len}")  # fmt: skip
        self.waiting.append(request)

    def idle(self) -> bool:
        return not self.waiting and self.active == 0

    # --- rows -----------------------------------------------------------------------------------
    def _place(self, request: Request, row: int) -> None:
        self.slots[row], request.row = request, row

    def _swap(self, first: int, second: int) -> None:
        self.rows.swap(first, second)
        a, b = self.slots[first], self.slots[second]
        self.slots[first], self.slots[second] = b, a
        for request, row in ((b, first), (a, second)):
            if request is not None:
                request.row = row

    def _release(self, request: Request, reason: str) -> None:
        """Finish a request and free its row, keeping the decoding rows one block."""
        row, decoding = request.row, request.row < self.decoding
        self.slots[row], request.row = None, -1
        self.rows.lengths[row] = 0
        if decoding:
            last = self.decoding - 1
            if row != last:
                self.rows.move(last, row)
                self._place(self.slots[last], row)
                self.slots[last] = None
            self.decoding -= 1
        request.finish_reason = reason
        request.on_finish(reason)

    def fail_active(self) -> None:
        """End every request holding a row with reason "error" (after a step raised) and free the rows."""
        for request in [slot for slot in self.slots if slot is not None]:
            self.slots[request.row], request.row = None, -1
            request.finish_reason = "error"
            request.on_finish("error")
        self.rows.lengths[:] = 0
        self.decoding = 0

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            request = self.waiting.popleft()
            if request.cancelled:
                request.finish_reason = "cancelled"
                request.on_finish("cancelled")
                continue
            row = self.slots.index(None, self.decoding)
            self._place(request, row)
            self.rows.lengths[row] = 0

    # --- tokens ---------------------------------------------------------------------------------
    def _emit(self, request: Request, new: list[int]) -> bool:
        """Append tokens up to EOS / the limit; True when the request is done."""
        kept: list[int] = []
        done = None
        for token in new:
            kept.append(token)
            if token in request.eos_token_ids:
                done = "stop"
                break
            if len(request.tokens) + len(kept) == request.max_new_tokens:
                done = "length"
                break
        request.tokens.extend(kept)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.on_tokens(kept)
        if done:
            self._release(request, done)
        return done is not None

    def _prefill(self) -> int:
        """One chunk of the oldest prefilling request; returns the prompt tokens it ran."""
        pending = [slot for slot in self.slots[self.decoding :] if slot is not None]
        if not pending:
            return 0
        request = min(pending, key=lambda r: r.arrived)
        if request.cancelled:
            self._release(request, "cancelled")
            return 0
        start = request.prefilled
        chunk = request.prompt_ids[start : start + self.prefill_chunk]
        last = start + len(chunk) == len(request.prompt_ids)
        wants = self._wants_logits(request) or (last and request.sampling.do_sample)
        outputs = ("next_ids", "logits") if wants else ("next_ids",)
        tokens = np.asarray([chunk], dtype=np.int64)
        parents = np.maximum(np.arange(len(chunk), dtype=np.int64) - 1, 0)[None]
        values = self.rows.run(request.row, tokens, parents, outputs)
        self.rows.lengths[request.row] += len(chunk)
        request.prefilled += len(chunk)
        if self._wants_logits(request):
            previous = [request.prompt_ids[start - 1] if start else -1, *chunk[:-1]]
            self._observe(chunk, values[1][0], previous)
        if last:
            if request.sampling.do_sample:
                first = choose_token(values[1][0][-1], request.sampling, request.rng)
            else:
                first = int(values[0][0][-1])
            if self.decoding != request.row:
                self._swap(self.decoding, request.row)
            self.decoding += 1
            self._emit(request, [first])
        return len(chunk)

    def _wants_logits(self, request: Request) -> bool:
        return not request.sampling.do_sample and any(getattr(s, "wants_logits", False) for s in self.sources)

    def _observe(self, tokens: list[int], logits: np.ndarray, previous: list[int]) -> None:
        for source in self.sources:
            if getattr(source, "wants_logits", False):
                source.observe_logits(tokens, logits, previous)

    def _drafts(self, requests: list[Request]) -> list[list[float]]:
        """Each greedy request's draft (kept on it) and its nodes' predicted acceptance."""
        probabilities = []
        for request in requests:
            request.draft = None
            room = min(request.max_new_tokens - len(request.tokens) - 1,
                       self.rows.max_seq_len - int(self.rows.lengths[request.row]) - 1)  # fmt: skip
            if not self.speculative or request.sampling.do_sample or room < 1:
                probabilities.append([])
                continue
            drafter = MergedDrafter(self.sources)
            drafter.acceptance = self.acceptance
            draft = drafter.propose(request.context, self.shape, request.sampling, request.rng)
            request.draft = draft
            probabilities.append(node_probabilities(draft, self.acceptance)[: max(room, 0)] if draft.tokens
                                 else [])  # fmt: skip
        return probabilities

    def _decode(self) -> int:
        """One verify call over the decoding rows; returns the tokens emitted."""
        count = self.decoding
        if count == 0:
            return 0
        requests = [self.slots[row] for row in range(count)]
        for request in [r for r in requests if r.cancelled]:
            self._release(request, "cancelled")
        count = self.decoding
        if count == 0:
            return 0
        requests = [self.slots[row] for row in range(count)]
        probabilities = self._drafts(requests)
        room = int(min(self.rows.max_seq_len - self.rows.lengths[:count]))
        steps = max(1, min(plan_tokens(probabilities, self.cost, self.max_tokens), room))
        tokens = np.zeros((count, steps), dtype=np.int64)
        parents = np.zeros((count, steps), dtype=np.int64)
        trees: list[tuple[list[int], list[int], list[int]]] = []
        for index, (request, nodes) in enumerate(zip(requests, probabilities, strict=True)):
            kept = sorted(likeliest_first(nodes)[: steps - 1]) if nodes else []
            renumber = {old: new for new, old in enumerate(kept)}
            draft = request.draft or Draft()
            tree_tokens = [request.tokens[-1], *(draft.tokens[old] for old in kept)]
            tree_parents = [0, *(renumber.get(draft.parents[old], -1) + 1 for old in kept)]
            tokens[index, : len(tree_tokens)] = tree_tokens
            tokens[index, len(tree_tokens) :] = tree_tokens[0]  # padding: copies of the root, its children
            parents[index, : len(tree_parents)] = tree_parents
            trees.append((tree_tokens, tree_parents, kept))
        sampling = any(r.sampling.do_sample for r in requests)
        wants = sampling or any(self._wants_logits(r) for r in requests)
        outputs = ("next_ids", "logits") if wants else ("next_ids",)
        values = self.rows.run(0, tokens, parents, outputs)
        results = []
        for index, request in enumerate(requests):
            tree_tokens, tree_parents, kept = trees[index]
            size = len(tree_tokens)
            request.target_steps += 1
            if request.sampling.do_sample:
                new, accepted = [choose_token(values[1][index][0], request.sampling, request.rng)], []
            else:
                result = accept_greedy(tree_tokens, children_of(tree_parents), values[0][index][:size])
                accepted = result.nodes
                new = [tree_tokens[node] for node in accepted] + [result.bonus]
                if self._wants_logits(request):
                    previous = [request.context[-2] if len(request.context) > 1 else -1,
                                *(tree_tokens[p] for p in tree_parents[1:])]  # fmt: skip
                    self._observe(tree_tokens, values[1][index][:size], previous)
                if request.draft is not None and request.draft.tokens:
                    self.acceptance.record(_subdraft(request.draft, kept), len(kept), accepted)
            self.rows.commit(request.row, accepted)
            results.append(new)
        emitted = 0
        for request, new in zip(requests, results, strict=True):  # after every commit: finishing moves rows
            before = len(request.tokens)
            self._emit(request, new)
            emitted += len(request.tokens) - before
        self.last.rows, self.last.tokens_per_row = count, steps
        return emitted

    def step(self) -> StepStats:
        """Admit, one prefill chunk, one decode call. Cancelled requests leave their rows."""
        start = time.perf_counter()
        self.last = StepStats()
        for request in [slot for slot in self.slots if slot is not None and slot.cancelled
                        and slot.row >= self.decoding]:  # fmt: skip
            self._release(request, "cancelled")
        self._admit()
        self.last.prefill_tokens = self._prefill()
        self.last.emitted = self._decode()
        self.last.seconds = time.perf_counter() - start
        return self.last


def _subdraft(draft: Draft, kept: list[int]) -> Draft:
    """The nodes `kept` of `draft` (sorted, parents kept before children), renumbered."""
    renumber = {old: new for new, old in enumerate(kept)}
    sub = Draft()
    for old in kept:
        sub.add(draft.tokens[old], renumber.get(draft.parents[old], -1), draft.sources[old],
                draft.evidence[old], draft.ranks[old], draft.seconded[old])  # fmt: skip
    return sub
