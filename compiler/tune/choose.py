"""Choosing the draft tree from measured costs and acceptance, or plain decoding (pure functions).

Predicted speed-up of a tree of n nodes and depth d, G = solve_tree(p, n, d).expected_tokens
(Sequoia's DP, compiler/tune/tree_dp.py), with the hit rate h (steps where the drafter proposed):
  tokens/step  h G + (1 - h)
  ms/step      h (verify_ms[n] + draft) + (1 - h) decode_ms
  speed-up     (tokens/step / ms/step) * decode_ms
The best (n, d) wins if its predicted speed-up exceeds 1, else plain decoding is chosen. Measured
costs are first made monotone (noise on a shared machine must not buy a big tree).
"""

from __future__ import annotations

from typing import Any

from skiptree.compiler.tune.tree_dp import solve_tree


def acceptance_by_depth(acceptance: list[float], chain_acceptance: list[float]) -> list[list[float]]:
    """Per-depth rank vectors: depth 1 as measured on width-W trees; deeper levels take the chain's
    conditional rank-1 acceptance, and the lower ranks of depth 1 scaled to keep the sum <= 1."""
    levels = [list(acceptance)]
    rest = sum(acceptance[1:])
    for first in chain_acceptance[1:]:
        scale = min(1.0, (1.0 - first) / rest) if rest > 0 else 0.0
        levels.append([first, *(p * scale for p in acceptance[1:])])
    return levels


def draft_ms(parents: tuple[int, ...], per_node_ms: float, level_ms: dict[int, float]) -> float:
    """Draft time of a tree: per-node cost (lookups) plus, for a draft model, one call per level
    with the level's width, priced by the nearest measured width at or above it."""
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    total = per_node_ms * len(parents)
    if level_ms:
        widths = [1] + [depth.count(d) for d in range(1, max(depth, default=0))]  # levels fed to the draft
        for width in widths:
            fit = min((w for w in level_ms if w >= width), default=max(level_ms))
            total += level_ms[fit] * max(1.0, width / fit)
    return total


def monotone(verify_ms: dict[int, float]) -> dict[int, float]:
    """Verify cost cannot fall as the tree grows; a measurement that does (a noisy neighbour on a
    shared machine) is raised to the largest cost of a smaller tree, so noise cannot buy a big tree."""
    out, highest = {}, 0.0
    for nodes, cost in sorted(verify_ms.items()):
        highest = max(highest, cost)
        out[nodes] = highest
    return out


def padded_level_ms(level_ms: dict[int, float]) -> dict[int, float]:
    """A draft level of width w costs at most a wider measured level (pad it): noise that makes a
    narrow level look dearer than a wide one (seen on a loaded machine; the case is pinned in
    tests/compiler/tune/test_tune.py) would otherwise push the choice to wide trees."""
    return {w: min(ms for wider, ms in level_ms.items() if wider >= w) for w in level_ms}


def choose_tree(acceptance: dict[str, Any], verify_ms: dict[int, float], decode_ms: float,
                max_depth: int = 8, level_ms: dict[int, float] | None = None,
                by_depth: list[list[float]] | None = None) -> dict[str, Any]:  # fmt: skip
    """The (n, d) with the best predicted speed-up, or plain decoding when none beats 1.0."""
    p, hit = acceptance["acceptance"], acceptance["hit_rate"]
    level_ms = padded_level_ms({w: ms for w, ms in (level_ms or {}).items() if ms > 0})
    best: dict[str, Any] = {"mode": "plain", "predicted_speedup": 1.0, "parents": []}
    candidates = []
    for nodes, cost in monotone(verify_ms).items():
        for depth in range(1, min(max_depth, nodes) + 1):
            tree = solve_tree(p, nodes, depth, by_depth)
            per_node = 0.0 if level_ms else acceptance["draft_ms_per_node"]  # a model: levels priced
            draft = draft_ms(tree.parents, per_node, level_ms)
            tokens = hit * tree.expected_tokens + (1 - hit)
            ms = hit * (cost + draft) + (1 - hit) * decode_ms
            speedup = tokens / ms * decode_ms
            candidates.append({"nodes": nodes, "depth": depth, "expected_tokens": tree.expected_tokens,
                               "predicted_speedup": speedup})  # fmt: skip
            if speedup > best["predicted_speedup"]:
                best = {"mode": "speculative", "predicted_speedup": speedup,
                        "parents": list(tree.parents), "expected_tokens": tree.expected_tokens,
                        "nodes": nodes, "depth": tree.depth}  # fmt: skip
    return {**best, "candidates": candidates}
