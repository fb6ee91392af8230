"""One speculation budget per step, shared by every request of the batch.

A batched verify call runs `b` rows (requests) of `T` tokens each (a tree is padded to the step's T),
so its cost is the measured `T_batch(b, T)`. Each greedy request brings a draft whose nodes carry
predicted acceptance probabilities (`skiptree.runtime.draft_gate.node_probabilities`: measured
acceptance by source, rank and evidence). For every T the step could run, each request keeps its
T - 1 likeliest nodes (a tree: a child is never likelier than its parent), and the step is worth

    sum over requests of (1 + the kept nodes' probabilities)  /  T_batch(b, T)

expected tokens per second; the best T wins, T = 1 (plain steps for all) included. As the batch
grows the plain step's tokens grow with it while a tree's extra rows cost b times more, so
speculation shrinks by itself, down to none where it would not pay (Sequoia's objective, with the
batch's cost in place of one request's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

TOKEN_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # tree sizes (root included) measured


@dataclass(frozen=True)
class BatchCost:
    """Seconds of one batched verify call, measured, by rows b (1..max) and tokens per row T."""

    tokens: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]  # seconds[b - 1][i]: b rows of tokens[i] tokens

    def __call__(self, rows: int, tokens: int) -> float:
        row = self.seconds[min(rows, len(self.seconds)) - 1]
        scale = rows / len(self.seconds) if rows > len(self.seconds) else 1.0
        return float(np.interp(tokens, self.tokens, row)) * scale

    def to_json(self) -> dict:
        return {"tokens": list(self.tokens), "seconds": [list(row) for row in self.seconds]}


def measure_batch_cost(run, max_rows: int, max_tokens: int, repeats: int = 3,
                       log=lambda message: None) -> BatchCost:  # fmt: skip
    """Time `run(rows, tokens)` (one batched verify call) for every row count up to `max_rows` and
    the tree sizes up to `max_tokens`; the median of `repeats` calls after one warm-up."""
    tokens = tuple(t for t in TOKEN_COUNTS if t <= max_tokens)
    table = []
    for rows in range(1, max_rows + 1):
        row = []
        for count in tokens:
            run(rows, count)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run(rows, count)
                times.append(time.perf_counter() - start)
            row.append(float(np.median(times)))
        table.append(tuple(row))
        timings = ", ".join(f"T={t} {s * 1e3:.1f} ms" for t, s in zip(tokens, row, strict=True))
        log(f"batch of {rows}: {timings}")
    # A bigger call never costs less: running maxima over T and over b take out timing noise that
    # would otherwise make the budget prefer an arbitrary size.
    smoothed = np.maximum.accumulate(np.maximum.accumulate(np.asarray(table), axis=1), axis=0)
    return BatchCost(tokens, tuple(tuple(float(v) for v in row) for row in smoothed))


def likeliest_first(probabilities: list[float]) -> list[int]:
    """Draft nodes by predicted acceptance, likeliest first (ties: parents before children)."""
    return sorted(range(len(probabilities)), key=lambda node: (-probabilities[node], node))


def plan_tokens(drafts: list[list[float]], cost: BatchCost | None, max_tokens: int) -> int:
    """Tokens per row T for a step whose requests' drafts have these node probabilities (a request
    that may not speculate brings []): the T with the most expected tokens per second. Without a
    measured cost every draft is verified whole (T = the largest draft + 1)."""
    largest = max((len(nodes) for nodes in drafts), default=0)
    limit = min(largest + 1, max_tokens)
    if cost is None or limit <= 1:
        return limit
    ordered = [np.cumsum(sorted(nodes, reverse=True)) if nodes else np.zeros(0) for nodes in drafts]
    best, best_speed = 1, -1.0
    for steps in range(1, limit + 1):
        gain = sum(1.0 + (float(sums[min(steps - 1, len(sums)) - 1]) if steps > 1 and len(sums) else 0.0)
                   for sums in ordered)  # fmt: skip
        speed = gain / cost(len(drafts), steps)
        if speed > best_speed:
            best, best_speed = steps, speed
    return best
