"""A GGUF source's Q4_0 / Q4_1 / Q8_0 weights are lowered to MatMulNBits on their own grid."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest

import skiptree
from skiptree.compiler.compile import compile_model
from skiptree.compiler.options import CompileOptions
from skiptree.models.gguf_convert import convert_gguf
from skiptree.models.gguf_grid import read_grid
from skiptree.runtime.manifest import GraphName

sys.path.insert(0, str(Path(__file__).parents[2] / "models"))
from test_gguf_convert import tiny_hf_model, write_gguf  # noqa: E402

QUIET = dict(log=lambda message: None)
MATMULS = 2 * 5 + 1  # 7 matrices a layer, fused graphs (head size 16) pack q|k|v into one; the head
PROMPT = [5, 17, 64, 33, 2, 9, 11, 40]


def converted(kind: str, root: Path) -> Path:
    """A converted tiny llama GGUF whose matrices are all of `kind`."""
    path = write_gguf(tiny_hf_model("llama"), root / "tiny.gguf", getattr(gguf.GGMLQuantizationType, kind))
    return convert_gguf(path, root / "model", progress=False)


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1", "Q8_0"])
def gguf_folder(request, tmp_path_factory):
    return request.param, converted(request.param, tmp_path_factory.mktemp(f"grid-{request.param}"))


def logits_of(artifact: Path) -> np.ndarray:
    runtime = skiptree.load(artifact)
    return runtime.step_model.forward(PROMPT, ("logits",))[0]


def test_the_converter_keeps_the_blocks_and_they_dequantise_to_the_floats(gguf_folder):
    from safetensors import safe_open

    kind, folder = gguf_folder
    grid = read_grid(folder)
    assert len(grid) == 2 * 7 + 1 and {tensor.kind for tensor in grid.values()} == {kind}  # + the embedding
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as weights:
        for name, tensor in grid.items():
            np.testing.assert_array_equal(tensor.dequantized(), weights.get_tensor(name))  # bit for bit


def test_quantised_on_the_grid_computes_the_gguf_model(gguf_folder, tmp_path):
    """float32 activations (accuracy=0): on the grid the int artifact is the float artifact, to float
    rounding; re-quantising the dequantised weights (block 64: off the grid) is not."""
    kind, folder = gguf_folder
    bits = "int8" if kind == "Q8_0" else "int4"
    plain = compile_model(folder, tmp_path / "float", CompileOptions(max_seq_len=32), **QUIET)
    reference = logits_of(plain)
    options = {"grid": f"{bits}:grid=yes,accuracy=0", "off": f"{bits}:block=64,accuracy=0"}
    on_grid, off_grid = (compile_model(folder, tmp_path / name, CompileOptions(max_seq_len=32, quantize=q),
                                       **QUIET) for name, q in options.items())  # fmt: skip
    entry = skiptree.load(on_grid).manifest.graphs[GraphName.VERIFY].quantization  # fused: q|k|v one matmul
    if kind == "Q8_0":  # float activations: ORT's 8-bit kernels compute in int8 only; the floats are the grid
        assert entry["gguf_grid"] == {"Q8_0 as float": MATMULS} and entry["quantized_matmuls"] == 0
    else:
        assert entry["gguf_grid"] == {kind: MATMULS} and entry["quantized_matmuls"] == MATMULS
        assert f"the GGUF grid kept for {MATMULS} {kind}" in skiptree.load(on_grid).precision
    scale = np.abs(reference).max()
    assert np.abs(logits_of(on_grid) - reference).max() < 1e-5 * scale
    assert np.abs(logits_of(off_grid) - reference).max() > 1e-3 * scale


def test_q8_0_runs_as_8_bit_codes_with_int8_activations(tmp_path):
    folder = converted("Q8_0", tmp_path)
    plain = logits_of(compile_model(folder, tmp_path / "float", CompileOptions(max_seq_len=32), **QUIET))
    options = CompileOptions(max_seq_len=32, quantize="int8:grid=yes")
    artifact = compile_model(folder, tmp_path / "int8", options, **QUIET)
    entry = skiptree.load(artifact).manifest.graphs[GraphName.VERIFY].quantization
    assert entry["gguf_grid"] == {"Q8_0": MATMULS} and entry["quantized_matmuls"] == MATMULS
    assert np.abs(logits_of(artifact) - plain).max() < 0.05 * np.abs(plain).max()  # int8 activations only


def test_q4_1_on_the_symmetric_kernel_computes_the_same_model(tmp_path):
    """With int8 activations a Q4_1 grid runs on MLAS's symmetric kernel (the minimum shifted by 8 d):
    the same model to int8 rounding, no further from the float model than with zero points."""
    folder = converted("Q4_1", tmp_path)
    plain = logits_of(compile_model(folder, tmp_path / "float", CompileOptions(max_seq_len=32), **QUIET))
    logits = {}
    for name, quantize in (("symmetric", "int4:grid=yes"), ("zero_points", "int4:grid=yes,sym=no")):
        artifact = compile_model(folder, tmp_path / name, CompileOptions(max_seq_len=32, quantize=quantize),
                                 **QUIET)  # fmt: skip
        graph = onnx.load(str(artifact / "verify.onnx"), load_external_data=False).graph
        nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
        inputs = 3 if name == "symmetric" else 4  # no zero points: MLAS's symmetric kernel
        assert len(nbits) == MATMULS and {len(node.input) for node in nbits} == {inputs}
        logits[name] = logits_of(artifact)
    errors = {name: float(np.abs(got - plain).max() / np.abs(plain).max()) for name, got in logits.items()}
    assert errors["symmetric"] < 0.05 and errors["symmetric"] <= errors["zero_points"]  # not further off


def test_packed_attention_projections_stay_on_the_grid(tmp_path):
    """A fused verify graph packs q|k|v into one matmul; its weight is the row concatenation of
    three grid tensors, so it is lowered on the grid too, and speculation stays lossless."""
    folder = converted("Q4_1", tmp_path)
    options = CompileOptions(max_seq_len=48, quantize="int4:grid=yes,accuracy=0", draft="prompt-lookup",
                             tree="chain:3")  # fmt: skip
    artifact = compile_model(folder, tmp_path / "int4", options, **QUIET)
    entry = skiptree.load(artifact).manifest.graphs[GraphName.VERIFY].quantization
    assert entry["gguf_grid"] == {"Q4_1": MATMULS}
    prompt = PROMPT * 3
    plain = skiptree.load(artifact, speculative=False).generate(prompt, max_new_tokens=16, eos_token_id=[])
    speculative = skiptree.load(artifact).generate(prompt, max_new_tokens=16, eos_token_id=[])
    assert speculative.token_ids == plain.token_ids
