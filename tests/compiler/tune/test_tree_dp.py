"""The tree DP is exact (against brute force on small cases) and fast on large ones."""

from __future__ import annotations

import functools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skiptree.compiler.tune.tree_dp import expected_tokens, solve_tree
from skiptree.runtime.tree import TreeShape


def brute_force_best(acceptance: tuple[float, ...], budget: int, max_depth: int, by_depth=()) -> float:
    """Enumerate every tree: a node's children are an ordered list of subtrees (rank 1, 2, ...)."""

    @functools.cache
    def best_forest(size: int, depth: int, rank: int) -> float:
        # best sum over children of ranks rank.. with `size` nodes in total, each of depth <= depth
        if size == 0:
            return 0.0
        child_depth = max_depth - depth + 1
        p = by_depth[child_depth - 1] if child_depth <= len(by_depth) else acceptance
        if depth == 0 or rank >= len(p):
            return float("-inf")
        return max(p[rank] * best_tree(a, depth - 1) + best_forest(size - a, depth, rank + 1)
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


@settings(max_examples=40, deadline=None)
@given(acceptance=acceptances, deeper=st.lists(acceptances, max_size=3), budget=st.integers(0, 8),
       max_depth=st.integers(0, 4))  # fmt: skip
def test_depth_dependent_matches_brute_force(acceptance, deeper, budget, max_depth):
    deeper = [list(v) + [0.0] * (len(acceptance) - len(v)) for v in deeper]  # same number of ranks
    solution = solve_tree(list(acceptance), budget, max_depth, by_depth=deeper)
    best = brute_force_best(acceptance, budget, max_depth, tuple(tuple(v) for v in deeper))
    assert solution.expected_tokens == pytest.approx(best, abs=1e-9)
    assert expected_tokens(list(acceptance), solution.parents, deeper) == pytest.approx(best, abs=1e-9)


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


def test_depth_dependent_acceptance_deepens_the_tree():
    flat = solve_tree([0.5, 0.2], budget=6, max_depth=6)
    deeper = solve_tree([0.5, 0.2], budget=6, max_depth=6, by_depth=[[0.5, 0.2]] + [[0.9, 0.05]] * 5)
    assert deeper.depth > flat.depth
    by_depth = [[0.5, 0.2]] + [[0.9, 0.05]] * 5
    assert expected_tokens([0.5, 0.2], deeper.parents, by_depth) == pytest.approx(deeper.expected_tokens)
    # exact: no tree of the same budget does better under the same acceptance
    for parents in ([-1, 0, 1, 2, 3, 4], [-1, -1, 0, 1, 2, 3], [-1, -1, 0, 0, 2, 4]):
        assert expected_tokens([0.5, 0.2], parents, by_depth) <= deeper.expected_tokens + 1e-12
