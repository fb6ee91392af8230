"""Tree presets and files parse into valid shapes; bad ones get one clear error."""

from __future__ import annotations

import json

import pytest

from skiptree.runtime.tree import TreeShape, TreeSpecError, parse_tree


def test_presets():
    assert parse_tree("chain:3").parents == (-1, 0, 1)
    shape = parse_tree("k-ary:2x2")
    assert shape.parents == (-1, -1, 0, 0, 1, 1) and shape.depth == 2 and shape.size == 6
    assert shape.children()[-1] == [0, 1] and shape.children()[1] == [4, 5]
    tailed = parse_tree("k-ary:2x1+chain:2")  # two guesses, each continued by a chain of two
    assert tailed.parents == (-1, -1, 0, 1, 2, 3) and tailed.depth == 3 and tailed.spec == "k-ary:2x1+chain:2"
    assert parse_tree("k-ary:2x2+chain:4").size == 6 + 4 * 4


def test_json_file(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"expected_tokens": 2.1, "parents": [-1, -1, 0], "depth": 2}))
    assert parse_tree(str(path)).parents == (-1, -1, 0)


@pytest.mark.parametrize("spec,message", [
    ("chain:0", "tree preset 'chain:0' is malformed; use chain:K, k-ary:WxD"),
    ("k-ary:2by3", "tree preset 'k-ary:2by3' is malformed"),
    ("k-ary:2x2+chain:0", "tree preset 'k-ary:2x2\\+chain:0' is malformed; use .* k-ary:WxD\\+chain:K"),
    ("bushy", "tree 'bushy' is neither a preset nor a file"),
])  # fmt: skip
def test_bad_specs(spec, message):
    with pytest.raises(TreeSpecError, match=message):
        parse_tree(spec)


def test_parents_must_come_first(tmp_path):
    with pytest.raises(TreeSpecError, match="tree node 1 has parent 2; a parent must be -1"):
        TreeShape((-1, 2, 0))
    path = tmp_path / "t.json"
    path.write_text("{}")
    with pytest.raises(TreeSpecError, match='has no valid "parents" list'):
        parse_tree(str(path))
