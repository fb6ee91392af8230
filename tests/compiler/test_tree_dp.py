"""The tree DP is exact (against brute force on small cases) and fast on large ones."""

from __future__ import annotations

import functools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skiptree.compiler.tree_dp import expected_tokens, solve_tree
from skiptree.runtime.tree import TreeShape


def brute_force_best(acceptance: tuple[float, ...], budget: int, max_depth: int) -> float:
    """Enumerate every tree: a node's children are an ordered list of subtrees (rank 1, 2, ...)."""

    @functools.cache
    def best_forest(size: int, depth: int, rank: int) -> float:
        # best sum over children of ranks rank.. with `size` nodes in total, each of depth <= depth
        if size == 0:
            return 0.0
        if depth == 0 or rank >= len(acceptance):
            return float("-inf")
        return max(acceptance[rank] * best_tree(a, depth - 1) + best_forest(size - a, depth, rank + 1)
                   for a in range(1, size + 1))  # fmt: skip

    @functools.cache
    def best_tree(size: int, depth: int) -> float:
        return 1.0 + best_forest(size - 1, depth, 0)

    return max(best_tree(m, max_depth) for m in range(1, budget + 2))


acceptances = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4).map(
    lambda xs: tuple(x / max(1.0, sum(xs)) for x in sorted(xs, reverse=True))
)


@settings(max_examples=60, deadline=None)
@given(acceptance=acceptances, budget=st.integers(0, 9), max_depth=st.integers(0, 5))
def test_matches_brute_force(acceptance, budget, max_depth):
    solution = solve_tree(list(acceptance), budget, max_depth)
    best = brute_force_best(acceptance, budget, max_depth)
    assert solution.expected_tokens == pytest.approx(best, abs=1e-9)
    TreeShape(solution.parents)  # parents come before children
    assert len(solution.parents) <= budget and solution.depth <= max_depth
    assert expected_tokens(list(acceptance), solution.parents) == pytest.approx(solution.expected_tokens)


def test_chain_formula():
    # one candidate per level accepted with probability a: G = (1 - a^(n+1)) / (1 - a)
    solution = solve_tree([0.6], budget=5, max_depth=10)
    assert solution.parents == (-1, 0, 1, 2, 3) and solution.depth == 5
    assert solution.expected_tokens == pytest.approx((1 - 0.6**6) / (1 - 0.6))


def test_children_are_listed_in_rank_order():
    solution = solve_tree([0.5, 0.3, 0.1], budget=6, max_depth=3)
    assert solution.parents[:2] == (-1, -1)  # the root's best two children first
    assert expected_tokens([0.5, 0.3, 0.1], solution.parents) == pytest.approx(solution.expected_tokens)


def test_large_budget_is_fast():
    acceptance = [0.25 * 0.7**i for i in range(16)]  # sums to 0.83
    start = time.perf_counter()
    solution = solve_tree(acceptance, budget=128, max_depth=10)
    assert time.perf_counter() - start < 2.0
    assert len(solution.parents) == 128 and solution.expected_tokens > 2.0
