"""The ONNX lowering of a model loaded by reference writes what the lowering of the loaded model
writes: the same graph and the same tensor bytes, with large weights' transposes folded."""

from __future__ import annotations

import onnx
import pytest
import torch
import transformers
from conftest import TINY_LLAMA, write_tiny_model
from onnx import numpy_helper

from skiptree.compiler.ir.pass_manager import PassManager
from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.lower import quantize as quantize_module
from skiptree.compiler.lower.to_onnx import lower_to_onnx
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.pipeline import build_pipeline
from skiptree.models.loader import load_model

WIDER = {**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 256, "vocab_size": 300}  # past the fold limit


def lowered(folder, out, by_reference: bool, options: CompileOptions) -> dict[str, onnx.ModelProto]:
    ir = trace_model(load_model(folder, torch.float32, by_reference=by_reference), 48)
    ir = PassManager(build_pipeline(options)).run(ir)
    out.mkdir()
    files = lower_to_onnx(ir, out)
    written = sorted(f for entry in files.values() for f in (entry["file"], entry["file"] + ".data"))
    assert sorted(p.name for p in out.iterdir()) == written  # no spill or temporary files left
    return {name: onnx.load(str(out / entry["file"])) for name, entry in files.items()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_lowering_by_reference_writes_what_lowering_in_memory_writes(tmp_path, monkeypatch, tied, quantize):
    folder = tmp_path / "model"
    write_tiny_model(folder, transformers.LlamaConfig(**WIDER, tie_word_embeddings=tied))
    options = CompileOptions(draft="prompt-lookup", quantize=quantize)
    loaded = lowered(folder, tmp_path / "loaded", False, options)
    monkeypatch.setattr(quantize_module, "CHUNK_BYTES", 1)  # and by reference, one quantizer run per matmul
    by_reference = lowered(folder, tmp_path / "by-reference", True, options)
    assert loaded.keys() == by_reference.keys()
    for name, model in by_reference.items():
        assert model.graph.node == loaded[name].graph.node
        tensors = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        expected = {t.name: numpy_helper.to_array(t) for t in loaded[name].graph.initializer}
        assert tensors.keys() == expected.keys()
        for key, value in tensors.items():
            assert value.tobytes() == expected[key].tobytes(), key
    transposes = [n for n in by_reference["verify"].graph.node if n.op_type == "Transpose"
                  and n.input[0] in {t.name for t in by_reference["verify"].graph.initializer}]  # fmt: skip
    # A weight read by one Transpose is stored transposed; the tied head's, which the embedding also
    # reads, stays a Transpose at run time in float (ORT folds it at load) and is folded by quantisation.
    assert len(transposes) == (1 if tied and not quantize else 0)
