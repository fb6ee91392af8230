"""Accepting draft tokens: greedy, and lossless sampling (chain and Sequoia's tree rule).

Nodes are numbered as in the verify graph: 0 is the root (the last accepted token), draft node i
is node i + 1. `children[u]` lists node u's children in rank order.

Greedy: from the root, step to the child whose token equals the target's argmax after the
current node; stop when no child matches. The target's argmax after the last accepted node is
the bonus token. Output equals plain greedy decoding exactly.

Sampling (Sequoia, children drawn without replacement from the draft distribution q): at node u
with target distribution p, for each child x in order accept with probability min(1, p(x)/q(x));
on rejection p <- norm(max(p - q, 0)) and q <- q without x, renormalised. If every child is
rejected, the next token is drawn from the residual p. A deterministic drafter (prompt lookup)
proposes with q = one-hot(x): accept with probability p(x), else p <- p without x. A single
child is the chain rule. Each emitted token is distributed exactly as the target's p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Acceptance:
    """The accepted draft nodes (verify numbering, root excluded, root->leaf order) and the bonus."""

    nodes: list[int]
    bonus: int


def children_of(parents_full: list[int]) -> list[list[int]]:
    """parents_full[i] = parent of node i in verify numbering (entry 0, the root's, is ignored)."""
    children: list[list[int]] = [[] for _ in parents_full]
    for node in range(1, len(parents_full)):
        children[parents_full[node]].append(node)
    return children


def accept_greedy(tokens: list[int], children: list[list[int]], target_next: np.ndarray) -> Acceptance:
    """tokens[i]: token of node i; target_next[i]: the target's argmax after node i."""
    node, accepted = 0, []
    while True:
        want = int(target_next[node])
        match = next((child for child in children[node] if tokens[child] == want), None)
        if match is None:
            return Acceptance(accepted, want)
        accepted.append(match)
        node = match


def _residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    return residual / total if total > 0 else p


def accept_sampling(
    tokens: list[int],
    children: list[list[int]],
    target_probs: np.ndarray,
    draft_probs: list[np.ndarray | None],
    rng: np.random.Generator,
) -> Acceptance:
    """target_probs[i]: the target's sampling distribution after node i ([T, V]);
    draft_probs[i]: the distribution node i's children were drawn from (None: deterministic)."""
    node, accepted = 0, []
    while True:
        p = target_probs[node].astype(np.float64)
        q = None if draft_probs[node] is None else draft_probs[node].astype(np.float64).copy()
        chosen = None
        for child in children[node]:
            x = tokens[child]
            q_x = 1.0 if q is None else q[x]
            if q_x > 0 and rng.random() * q_x < p[x]:  # u < p(x) / q(x)
                chosen = child
                break
            if q is None:
                p = p.copy()
                p[x] = 0.0
                p = p / p.sum() if p.sum() > 0 else target_probs[node].astype(np.float64)
            else:
                p = _residual(p, q)
                q[x] = 0.0
                q = q / q.sum() if q.sum() > 0 else None
        if chosen is None:
            return Acceptance(accepted, int(rng.choice(p.shape[0], p=p / p.sum())))
        accepted.append(chosen)
        node = chosen
