"""Weights written tensor by tensor: a graph with in-memory and external tensors saves and reloads exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from skiptree.compiler.lower import external_data
from skiptree.compiler.lower.external_data import save_streaming


def test_a_graph_rewritten_without_loading_its_weights_saves_every_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(external_data, "COPY_CHUNK", 1000)  # external copies span several chunks
    rng = np.random.default_rng(0)
    weights = {"big": rng.standard_normal((64, 48)).astype(np.float32),
               "other": rng.standard_normal((300,)).astype(np.float32),
               "tiny": np.arange(3, dtype=np.int64)}  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "big"], ["y"]), helper.make_node("Add", ["y", "other"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 48])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])  # fmt: skip
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="g.onnx.data", size_threshold=1024)  # fmt: skip
    model = onnx.load(str(path), load_external_data=False)
    added = rng.standard_normal((40, 40)).astype(np.float32)  # what a rewrite adds, in memory
    model.graph.initializer.append(numpy_helper.from_array(added, "added"))
    model.graph.initializer.append(helper.make_tensor("typed", TensorProto.FLOAT, [400], added.ravel()[:400]))
    save_streaming(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]  # the old data replaced
    reloaded = onnx.load(str(path))  # relative locations, resolved next to the graph
    arrays = {t.name: numpy_helper.to_array(t) for t in reloaded.graph.initializer}
    for name, value in {**weights, "added": added, "typed": added.ravel()[:400]}.items():
        np.testing.assert_array_equal(arrays[name], value)
    stored = onnx.load(str(path), load_external_data=False)
    kinds = {t.name: t.data_location for t in stored.graph.initializer}
    assert kinds["tiny"] == TensorProto.DEFAULT and kinds["big"] == kinds["added"] == TensorProto.EXTERNAL
    offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in stored.graph.initializer
               if t.data_location == TensorProto.EXTERNAL]  # fmt: skip
    assert all(offset % external_data.ALIGN == 0 for offset in offsets)
