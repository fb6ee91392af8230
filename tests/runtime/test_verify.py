"""Acceptance rules: greedy walks the argmax path; sampling keeps the target's distribution
(chi-square on an 8-token vocabulary, fixed seeds, chain and tree rules, random and one-hot q)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from skiptree.runtime.tree import TreeShape, chain, k_ary
from skiptree.runtime.verify import accept_greedy, accept_sampling, children_of

VOCAB = 8


def chi2_survival(statistic: float, dof: int) -> float:
    """P(chi-square with dof degrees of freedom > statistic), Wilson-Hilferty approximation."""
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_greedy_accepts_the_longest_matching_path_then_the_bonus():
    # root(9) -> [5, 6]; 6 -> [7, 8]; 8 -> [4]
    tokens = [9, 5, 6, 7, 8, 4]
    children = children_of([0, 0, 0, 2, 2, 4])
    target_next = np.array([6, 0, 8, 0, 3, 0])  # after root: 6; after 6: 8; after 8: 3 (not 4)
    result = accept_greedy(tokens, children, target_next)
    assert result.nodes == [2, 4] and result.bonus == 3
    assert accept_greedy(tokens, children, np.array([1, 0, 0, 0, 0, 0])).nodes == []


def distributions(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Target p(next | token) and draft q(next | token) for every token: [V, V] each."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(VOCAB) * 0.7, VOCAB), rng.dirichlet(np.ones(VOCAB) * 0.7, VOCAB)


def speculate_two_tokens(shape: TreeShape, p, q, rng, one_hot: bool) -> tuple[int, int]:
    """Draft `shape` after token 0, verify it, and return the first two tokens it emits."""
    kids = shape.children()
    tokens, child_probs, node_of = [0], [], {-1: 0}
    pending = [-1]
    while pending:
        node = pending.pop(0)
        parent_token = tokens[node_of[node]]
        count = len(kids[node])
        if one_hot:  # a deterministic drafter: fixed distinct guesses, q = one-hot
            guesses = [(parent_token + 1 + i) % VOCAB for i in range(count)]
            child_probs.append(None)
        else:
            guesses = list(rng.choice(VOCAB, size=count, replace=False, p=q[parent_token]))
            child_probs.append(q[parent_token])
        for kid, token in zip(kids[node], guesses, strict=True):
            node_of[kid] = len(tokens)
            tokens.append(int(token))
            pending.append(kid)
    order = sorted(node_of, key=node_of.get)  # verify numbering
    parents_full = [0] + [node_of[shape.parents[n]] if shape.parents[n] >= 0 else 0 for n in order[1:]]
    target = p[np.array(tokens)]
    result = accept_sampling(tokens, children_of(parents_full), target, child_probs, rng)
    emitted = [tokens[n] for n in result.nodes] + [result.bonus]
    if len(emitted) == 1:  # only the bonus: the second token comes from the next step's target
        emitted.append(int(rng.choice(VOCAB, p=p[emitted[0]])))
    return emitted[0], emitted[1]


@pytest.mark.parametrize("shape,one_hot", [
    (chain(2), False), (k_ary(3, 2), False), (TreeShape((-1, -1, 0, 1, 3)), False),
    (chain(2), True), (k_ary(2, 2), True),
])  # fmt: skip
def test_sampling_keeps_the_target_distribution(shape, one_hot):
    # a broken rule (e.g. always accepting the draft) fails this by a wide margin: see
    # test_a_biased_rule_is_detected below
    p, q = distributions(seed=3)
    rng = np.random.default_rng(2024)
    samples = 24_000
    counts = np.zeros((VOCAB, VOCAB))
    for _ in range(samples):
        first, second = speculate_two_tokens(shape, p, q, rng, one_hot)
        counts[first, second] += 1
    expected = (p[0][:, None] * p) * samples  # P(a, b) = p(a | 0) p(b | a)
    keep = expected.ravel() > 5
    statistic = ((counts.ravel()[keep] - expected.ravel()[keep]) ** 2 / expected.ravel()[keep]).sum()
    assert chi2_survival(statistic, int(keep.sum()) - 1) > 1e-3, statistic


def test_a_biased_rule_is_detected():
    """The statistic has power: emitting the draft's own samples (q, not p) is rejected."""
    p, q = distributions(seed=3)
    rng = np.random.default_rng(7)
    counts = np.bincount(rng.choice(VOCAB, size=24_000, p=q[0]), minlength=VOCAB)
    expected = p[0] * 24_000
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert chi2_survival(statistic, VOCAB - 1) < 1e-6
