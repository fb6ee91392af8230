"""Static draft-tree shapes: `chain:K`, `k-ary:WxD`, or a JSON file `{"parents": [...]}`.

`parents[i]` is the parent of draft node i (-1 = the root, i.e. the last accepted token); parents
come before children, and the children of a node are listed in rank order (the first listed is
the drafter's best guess). The tuner writes the same JSON format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skiptree.errors import SkiptreeError


class TreeSpecError(SkiptreeError):
    """A tree preset or file that does not describe a valid draft tree."""


@dataclass(frozen=True)
class TreeShape:
    parents: tuple[int, ...]
    spec: str = ""

    def __post_init__(self) -> None:
        for node, parent in enumerate(self.parents):
            if not -1 <= parent < node:
                raise TreeSpecError(
                    f"tree node {node} has parent {parent}; a parent must be -1 (the root) or an "
                    "earlier node", "list parents before their children",
                )  # fmt: skip

    @property
    def size(self) -> int:
        return len(self.parents)

    def children(self) -> dict[int, list[int]]:
        """Node -> its children in rank order; key -1 is the root."""
        out: dict[int, list[int]] = {-1: []}
        for node, parent in enumerate(self.parents):
            out.setdefault(parent, []).append(node)
            out.setdefault(node, [])
        return out

    def depths(self) -> list[int]:
        """Depth of each draft node (a child of the root has depth 1)."""
        depth: list[int] = []
        for parent in self.parents:
            depth.append(1 if parent < 0 else depth[parent] + 1)
        return depth

    @property
    def depth(self) -> int:
        return max(self.depths(), default=0)

    def to_json(self) -> dict:
        return {"spec": self.spec, "parents": list(self.parents), "depth": self.depth}


def chain(length: int) -> TreeShape:
    return TreeShape(tuple(range(-1, length - 1)), f"chain:{length}")


def k_ary(width: int, depth: int) -> TreeShape:
    """`width` children per node, `depth` levels, breadth-first."""
    parents: list[int] = []
    level = [-1]
    for _ in range(depth):
        next_level = []
        for parent in level:
            for _ in range(width):
                parents.append(parent)
                next_level.append(len(parents) - 1)
        level = next_level
    return TreeShape(tuple(parents), f"k-ary:{width}x{depth}")


def with_tails(shape: TreeShape, length: int, spec: str) -> TreeShape:
    """`shape` with a chain of `length` nodes under each of its deepest nodes, level by level."""
    parents, depths = list(shape.parents), shape.depths()
    level = [node for node, depth in enumerate(depths) if depth == shape.depth]
    for _ in range(length):
        parents.extend(level)
        level = list(range(len(parents) - len(level), len(parents)))
    return TreeShape(tuple(parents), spec)


def parse_tree(spec: str) -> TreeShape:
    """`chain:K`, `k-ary:WxD`, `k-ary:WxD+chain:K` (each deepest node continued by a chain of K:
    a few guesses near the root, one long line after each) or the path of a JSON tree file."""
    usage = ("use chain:K, k-ary:WxD (W children per node, D levels), k-ary:WxD+chain:K (a chain of K "
             "under each deepest node) or a JSON file {\"parents\": [...]}")  # fmt: skip
    try:
        if spec.startswith("k-ary:") and "+chain:" in spec:
            head, length = spec.split("+chain:", 1)
            if int(length) < 1:
                raise ValueError
            return with_tails(parse_tree(head), int(length), spec)
        if spec.startswith("chain:"):
            length = int(spec.split(":", 1)[1])
            if length < 1:
                raise ValueError
            return chain(length)
        if spec.startswith("k-ary:"):
            width, depth = (int(x) for x in spec.split(":", 1)[1].lower().split("x"))
            if width < 1 or depth < 1:
                raise ValueError
            return k_ary(width, depth)
    except ValueError:
        raise TreeSpecError(f"tree preset '{spec}' is malformed", usage) from None
    path = Path(spec)
    if not path.is_file():
        raise TreeSpecError(f"tree '{spec}' is neither a preset nor a file", usage)
    try:
        parents = json.loads(path.read_text())["parents"]
        return TreeShape(tuple(int(p) for p in parents), str(path))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise TreeSpecError(f"tree file {path} has no valid \"parents\" list ({exc})", usage) from exc


def tree_bias(parents: list[int], prefix_len: int, first_slot: int, rows: list[int], max_seq_len: int,
              dtype: np.dtype) -> np.ndarray:  # fmt: skip
    """[1, 1, len(rows), S] bias for draft nodes `rows`: each sees the cached prefix [0, prefix_len)
    and the slots `first_slot + j` of its ancestors j and itself (node j lives at first_slot + j)."""
    allowed = np.zeros((len(rows), max_seq_len), dtype=bool)
    allowed[:, :prefix_len] = True
    for row, node in enumerate(rows):
        while node >= 0:
            allowed[row, first_slot + node] = True
            node = parents[node]
    return np.where(allowed, 0.0, np.finfo(dtype).min).astype(dtype)[None, None]
