"""TVM int4: the kernel's rows are bit-identical at any row count; int4 speculation == int4 plain decoding."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
import tvm
from conftest import write_tiny_model, write_word_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax
from tvm.script import from_source

import skiptree
from skiptree.compiler.compile import compile_model
from skiptree.compiler.lower.to_tvm import host_target, quiet_native_logs
from skiptree.compiler.lower.tvm_int4 import (
    Int4Choice,
    _quantize_source,
    host_has_avx2,
    kernel_object,
    quantize_int4,
    quantize_matmuls,
)
from skiptree.compiler.options import CompileOptionError, CompileOptions
from skiptree.runtime.manifest import GraphName
from skiptree.runtime.tvm_step import set_threads

pytestmark = pytest.mark.skipif(not host_has_avx2(), reason="the int4 kernel needs AVX2 + FMA")
QUIET = {"log": lambda message: None}
# K = 64 and 128 (hidden, MLP): multiples of the kernel's block pair, unlike conftest's TINY_LLAMA
INT4_LLAMA = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)  # fmt: skip


def dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    values = np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.float32) - 8  # [N, K/32, 32]
    return (values * scales[..., None]).reshape(codes.shape[0], -1)


@pytest.fixture(scope="module")
def matmul_machine(tmp_path_factory):
    """A VM over one Relax function y = x [1, T, K] @ W [N, K]^T, rewritten to the int4 kernel; a
    second entry returns the codes and scales the graph computes from W."""
    n, k = 80, 192  # N >= 64: the kernel splits columns over the thread pool
    x = relax.Var("x", relax.TensorType([1, tvm.tirx.Var("t", "int64"), k], "float32"))
    w = relax.Var("w", relax.TensorType([n, k], "float32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x, w], attrs={"num_input": 1}):
        with builder.dataflow():
            y = builder.emit_output(builder.emit(relax.op.matmul(x, builder.emit(relax.op.permute_dims(w)))))
        builder.emit_func_output(y)
    module, rewritten = quantize_matmuls(builder.get(), Int4Choice(head=True, vocab_size=97))
    assert rewritten == 1
    for output in ("codes", "scales"):
        module[f"quantize_{output}"] = from_source(_quantize_source(n, k, output)).with_attr(
            "global_symbol", f"quantize_{output}")  # fmt: skip
    folder = tmp_path_factory.mktemp("int4-kernel")
    with quiet_native_logs():
        executable = tvm.compile(module, host_target(2))
    executable.export_library(str(folder / "matmul.so"), options=[str(kernel_object(folder))])
    library = tvm.runtime.load_module(str(folder / "matmul.so"))
    return relax.VirtualMachine(library, tvm.cpu()), library, n, k


def test_the_graph_quantises_as_the_numpy_rule(matmul_machine):
    _, library, n, k = matmul_machine
    weight = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    weight[0, :32] = 0.0  # an all-zero block: scale 0, every code 8
    weight[1, :32] = np.linspace(-2.0, 1.0, 32)  # the negative end has the larger magnitude
    codes, scales = quantize_int4(weight)
    got_codes = tvm.runtime.tensor(np.zeros_like(codes))
    got_scales = tvm.runtime.tensor(np.zeros_like(scales))
    library.get_function("quantize_codes", query_imports=True)(tvm.runtime.tensor(weight), got_codes)
    library.get_function("quantize_scales", query_imports=True)(tvm.runtime.tensor(weight), got_scales)
    np.testing.assert_array_equal(got_codes.numpy(), codes)
    np.testing.assert_array_equal(got_scales.numpy(), scales)
    assert scales[0, 0] == 0 and (codes[0, 0] == 0x88).all()
    assert scales[1, 0] == np.float32(0.25)  # -2 / -8
    error, step = np.abs(dequantize(codes, scales) - weight), np.repeat(np.abs(scales), 32, axis=1)
    assert (error <= step + 1e-6).all()  # (the far end of a block clips at code 15: up to a step)
    assert (error <= step / 2 + 1e-6).mean() > 0.98  # the rest rounds to the nearest of 16 levels


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(2, 40), seed=st.integers(0, 2**16), threads=st.sampled_from([1, 2]))
def test_a_row_is_bit_identical_alone_and_in_any_batch(matmul_machine, rows, seed, threads):
    machine, _, n, k = matmul_machine
    set_threads(threads)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, rows, k)) * rng.uniform(0.1, 10)).astype(np.float32)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    w = tvm.runtime.tensor(weight)
    batch = machine["main"](tvm.runtime.tensor(x), w).numpy()
    for row in range(rows):
        alone = machine["main"](tvm.runtime.tensor(x[:, row : row + 1]), w).numpy()
        np.testing.assert_array_equal(alone[0, 0], batch[0, row])
    for split in (1, rows // 2):  # and in a batch of other rows
        part = machine["main"](tvm.runtime.tensor(x[:, split:]), w).numpy()
        np.testing.assert_array_equal(part[0], batch[0, split:])
    exact = x[0] @ dequantize(*quantize_int4(weight)).T  # int8 activations: close, not equal
    assert np.abs(batch[0] - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.fixture(scope="module")
def int4_artifacts(tmp_path_factory):
    """(plain int4 TVM artifact, int4 TVM artifacts speculating on two trees) of one tiny Llama."""
    root = tmp_path_factory.mktemp("tvm-int4")
    folder = root / "model"
    write_tiny_model(folder, transformers.LlamaConfig(**INT4_LLAMA))
    write_word_tokenizer(folder)
    options = dict(backend="tvm", quantize="int4", max_seq_len=64)
    plain = skiptree.load(compile_model(folder, root / "plain", CompileOptions(**options), **QUIET))
    trees = []
    for tree in ("k-ary:2x2", "chain:3"):
        speculative = CompileOptions(**options, draft="prompt-lookup", tree=tree)
        artifact = compile_model(folder, root / tree.replace(":", "-"), speculative, **QUIET)
        trees.append(skiptree.load(artifact))
    return plain, trees


def test_int4_artifacts_say_what_they_run(int4_artifacts):
    plain, (tree, _) = int4_artifacts
    quantization = tree.manifest.graphs[GraphName.VERIFY].quantization
    assert quantization["quantized_matmuls"] == 2 * 7 + 1  # q k v o gate up down a layer, and the head
    assert quantization["batch_invariant"] and quantization["bits"] == 4
    assert "int4 weights (block 32, symmetric), int8 activations" in plain.description
    assert "LOSSY" not in tree.description  # a branching tree is exact on this kernel


def test_verify_rows_equal_one_token_steps_bit_for_bit(int4_artifacts):
    plain, _ = int4_artifacts
    steps, prompt = plain.step_model, [4, 8, 15, 16, 23, 42, 7]
    steps.cache.length = 0
    together = steps.forward(prompt, ("logits",))[0]
    steps.cache.length = 0
    alone = np.stack([steps.forward([token], ("logits",))[0][0] for token in prompt])
    np.testing.assert_array_equal(alone, together)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.integers(3, 96), min_size=1, max_size=10), repeats=st.integers(1, 3),
       new=st.integers(1, 24))  # fmt: skip
def test_int4_speculation_equals_int4_plain_decoding(int4_artifacts, prompt, repeats, new):
    plain, trees = int4_artifacts
    prompt = prompt * repeats  # repeats give prompt lookup drafts to verify
    expected = plain.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids
    for tree in trees:
        assert tree.generate(prompt, max_new_tokens=new, eos_token_id=[]).token_ids == expected


@pytest.mark.parametrize("quantize", ["int8", "int4:block=64", "int4:sym=no", "int4:grid=yes",
                                      "int4:accuracy=0"])  # fmt: skip
def test_other_formats_are_refused_on_tvm(quantize):
    message = r"TVM lowers int4 \(block 32, symmetric, int8 activations\) only"
    with pytest.raises(CompileOptionError, match=message):
        CompileOptions(backend="tvm", quantize=quantize).validate(64)


def test_int4_speculation_accepts_drafts(int4_artifacts):
    plain, trees = int4_artifacts
    prompt = [5, 6, 7, 8] * 4
    expected = plain.generate(prompt, max_new_tokens=30, eos_token_id=[]).token_ids
    for tree in trees:
        result = tree.generate(prompt, max_new_tokens=30, eos_token_id=[]).result
        assert result.token_ids == expected
        assert sum(step.accepted for step in result.steps) > 0


@pytest.mark.slow
def test_smollm2_tvm_int4_rows_are_batch_invariant_and_trees_are_lossless(tmp_path):
    """SmolLM2 on TVM int4: a token's logits are the same bits as a one-token step and as a row of a
    many-token call (no padding), so a branching tree's speculation equals plain decoding."""
    from skiptree.models.zoo import fetch

    options = CompileOptions(backend="tvm", max_seq_len=160, quantize="int4", draft="prompt-lookup",
                             tree="k-ary:2x2")  # fmt: skip
    artifact = compile_model(fetch("smollm2-135m", progress=False), tmp_path / "int4", options, **QUIET)
    plain, speculative = skiptree.load(artifact, speculative=False), skiptree.load(artifact)
    assert "LOSSY" not in speculative.description
    step = plain.step_model
    prompt = plain.tokenizer.encode("def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1)")
    step.cache.length = 0
    step.forward(prompt[:-5], ("logits",))
    one_by_one = np.stack([step.forward([token], ("logits",))[0][0] for token in prompt[-5:]])
    step.cache.length = len(prompt) - 5
    np.testing.assert_array_equal(one_by_one, step.forward(prompt[-5:], ("logits",))[0])
    for text in ("def fib(n):", "a = [1, 2, 3]\nb = [1, 2, 3]\nc = [1, 2, 3]\nd ="):
        ids = plain.encode_prompt(text)
        expected = plain.generate(ids, max_new_tokens=48, eos_token_id=[]).token_ids
        assert speculative.generate(ids, max_new_tokens=48, eos_token_id=[]).token_ids == expected
