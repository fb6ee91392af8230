"""Sequoia's tree dynamic program: the draft tree with the most expected tokens per step.

Given p_r = probability that the r-th ranked draft child of an accepted node is the accepted one,
a tree's expected tokens per step is G = sum over nodes v of prod of p_rank along root -> v, the
root counting 1. With c(m, d) = the best G of a subtree of m nodes (its root included) and depth
at most d:

    c(1, d) = 1
    c(m, d) = 1 + max over children ranks 1..b, sizes a_1..a_b (sum = m - 1) of sum_r p_r c(a_r, d - 1)

The inner max is a knapsack over ranks (children take ranks 1, 2, ... in order, none skipped):
    f(r, s) = max over a in 1..s of p_r c(a, d - 1) + f(r + 1, s - a),   f(r, 0) = 0
vectorised over a with numpy, so budget 128, depth 10, 16 ranks solves in well under a second.
Pure functions over measured numbers: no I/O, no globals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEG = -1e18


@dataclass(frozen=True)
class TreeSolution:
    expected_tokens: float  # G, the root included
    parents: tuple[int, ...]  # draft node -> parent (-1 = root); level order, children by rank
    depth: int

    def to_json(self) -> dict:
        return {"expected_tokens": self.expected_tokens, "parents": list(self.parents), "depth": self.depth}


def _knapsack(acceptance: np.ndarray, child_best: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """f[r, s] for ranks r..k-1 and size s (children subtrees of total size s), and the arg a."""
    ranks = acceptance.shape[0]
    best = np.full((ranks + 1, budget + 1), NEG)
    best[:, 0] = 0.0
    choice = np.zeros((ranks + 1, budget + 1), dtype=np.int64)
    for rank in range(ranks - 1, -1, -1):
        for size in range(1, budget + 1):
            sizes = np.arange(1, size + 1)  # a: the size of the rank-th child's subtree
            subtree = child_best[sizes]
            # an infeasible subtree stays infeasible even at p = 0 (0 * NEG would look feasible)
            gain = np.where(subtree > NEG / 2, acceptance[rank] * subtree, NEG)
            values = gain + best[rank + 1, size - sizes]
            pick = int(np.argmax(values))
            best[rank, size], choice[rank, size] = values[pick], sizes[pick]
    return best, choice


def _check(p: np.ndarray) -> np.ndarray:
    if p.ndim != 1 or (p < 0).any() or p.sum() > 1 + 1e-9:
        raise ValueError("acceptance must be probabilities summing to <= 1; budget, depth >= 0")
    return p


def solve_tree(acceptance: list[float] | np.ndarray, budget: int, max_depth: int,
               by_depth: list[list[float]] | None = None) -> TreeSolution:  # fmt: skip
    """The tree of at most `budget` draft nodes and depth <= `max_depth` maximising G.

    `by_depth[k - 1]`, where given, replaces `acceptance` for children at depth k (a drafter whose
    deeper guesses are likelier once the first was right, such as prompt lookup)."""
    p = _check(np.asarray(acceptance, dtype=np.float64))
    levels = [_check(np.asarray(v, dtype=np.float64)) for v in (by_depth or [])]
    if budget < 0 or max_depth < 0:
        raise ValueError("acceptance must be probabilities summing to <= 1; budget, depth >= 0")
    size = budget + 1  # the root included
    # best[d][m]: c(m, d) for a subtree whose root sits d levels above the depth limit
    best = [np.concatenate([[NEG, 1.0], np.full(size - 1, NEG)])]
    choices = [None]
    for remaining in range(1, max_depth + 1):
        child_depth = max_depth - remaining + 1
        level_p = levels[child_depth - 1] if child_depth <= len(levels) else p
        knap, choice = _knapsack(level_p, best[-1], size - 1)
        layer = np.full(size + 1, NEG)
        layer[1:] = 1.0 + knap[0, : size]
        best.append(layer)
        choices.append(choice)
    total = int(np.argmax(best[max_depth][1:])) + 1  # fewer nodes when more cannot be placed
    parents: list[int] = []
    _build(total, max_depth, choices, parents, parent=-1)
    return TreeSolution(float(best[max_depth][total]), _level_order(parents), _depth(parents))


def _build(size: int, depth: int, choices, parents: list[int], parent: int) -> None:
    """Append the draft nodes of an optimal subtree of `size` nodes (root = `parent`), depth-first."""
    remaining, rank = size - 1, 0
    while remaining > 0:
        child_size = int(choices[depth][rank, remaining])
        parents.append(parent)
        _build(child_size, depth - 1, choices, parents, len(parents) - 1)
        remaining -= child_size
        rank += 1


def _depth(parents: list[int]) -> int:
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return max(depths, default=0)


def _level_order(parents: list[int]) -> tuple[int, ...]:
    """Renumber a depth-first tree breadth-first, keeping each node's children in rank order."""
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        children.setdefault(parent, []).append(node)
    order, queue = [], [-1]
    while queue:
        node = queue.pop(0)
        for child in children.get(node, []):
            order.append(child)
            queue.append(child)
    new_index = {old: new for new, old in enumerate(order)}
    return tuple(-1 if parents[old] < 0 else new_index[parents[old]] for old in order)


def expected_tokens(acceptance: list[float], parents: list[int] | tuple[int, ...],
                    by_depth: list[list[float]] | None = None) -> float:  # fmt: skip
    """G of a given tree (root included): sum of path products of the children's rank probabilities."""
    rank_seen: dict[int, int] = {}
    reach: list[float] = []
    depth: list[int] = []
    for parent in parents:
        rank = rank_seen.get(parent, 0)
        rank_seen[parent] = rank + 1
        depth.append(1 if parent < 0 else depth[parent] + 1)
        vector = by_depth[depth[-1] - 1] if by_depth and depth[-1] <= len(by_depth) else acceptance
        p = vector[rank] if rank < len(vector) else 0.0
        reach.append(p * (1.0 if parent < 0 else reach[parent]))
    return 1.0 + sum(reach)
