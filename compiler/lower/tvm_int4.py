"""Int4 weights for the TVM backend: each quantised `matmul(x, permute_dims(W))` -> our int4 kernel.

`int4_kernel.c` multiplies int8 activations (one scale per block of 32) by symmetric int4 weights
(block 32) with AVX2 integer dot products, and is batch-invariant: a row's output is bit-identical
in a one-row call and in a 64-row one, so a speculative verify step and a plain decode step of the
same artifact compute the same model, whatever the tree (ORT's MatMulNBits is not; see
bench/results/matmulnbits_rows.md). The compiler builds it with the system's C compiler (the one
TVM links its libraries with) and links it into every graph's shared library.

The rewrite (`quantize_matmuls`) runs on the imported Relax module, before weights are lifted:
  W [N, K] (a weight argument) -> codes = int4_codes(W), scales = int4_scales(W)  (weights only:
      `LiftTransformParams` moves them into `transform_params`, run once at compile time, so the
      artifact stores codes and scales, not W)
  matmul(x, permute_dims(W)) -> int4_matmul(x, codes, scales)  (`T.call_extern` of the kernel)
Quantisation is ggml's Q4_0 rule: d = (the block's value of largest magnitude) / -8, code =
clamp(round(w / d) + 8, 0, 15). Matmuls whose K is not a multiple of 64 stay float32.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm import tirx as tir
from tvm.script import from_source

from skiptree.compiler.lower.tvm_inplace import OPAQUE, shape_script

KERNEL_SOURCE = Path(__file__).with_name("int4_kernel.c")
KERNEL_SYMBOL = "skiptree_int4_matmul"
BLOCK = 32
K_MULTIPLE = 2 * BLOCK  # the kernel takes blocks in pairs
MATMUL = tvm.ir.Op.get("relax.matmul")
PERMUTE_DIMS = tvm.ir.Op.get("relax.permute_dims")
ATTRS = f"{{'s_tir': True, 'tirx.noalias': True, 'tirx.is_scheduled': True, 'op_pattern': {OPAQUE}}}"


def c_compiler() -> str | None:
    """The C compiler TVM links with (`CC`, else gcc or cc on PATH), or None."""
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    return None


def host_has_avx2() -> bool:
    """The kernel needs AVX2 and FMA (x86-64 since 2013/2015)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def kernel_object(folder: Path) -> Path:
    """Compile `int4_kernel.c` into `folder/int4_kernel.o` (position independent, AVX2 + FMA)."""
    compiler = c_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC): the TVM int4 kernel is compiled at lowering")
    target = Path(folder) / "int4_kernel.o"
    subprocess.run([compiler, "-O3", "-mavx2", "-mfma", "-fPIC", "-c", str(KERNEL_SOURCE), "-o", str(target)],
                   check=True, capture_output=True)  # fmt: skip
    return target


def quantize_int4(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule the lowered graphs apply (in TIR), in numpy: W [N, K] -> (codes [N, K/32, 16] uint8,
    scales [N, K/32] float32). Tests compare the two; dequantised: (code - 8) * scale."""
    n, k = weight.shape
    blocks = weight.reshape(n, k // BLOCK, BLOCK).astype(np.float32)
    top, low = np.maximum(blocks.max(-1), 0), np.minimum(blocks.min(-1), 0)
    peak = np.where(top >= -low, top, low).astype(np.float32)
    scales = (peak / np.float32(-8)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(scales == 0, np.float32(0), np.float32(1) / scales).astype(np.float32)
    scaled = (blocks * inverse[..., None]).astype(np.float64)
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)  # half away from zero, as llvm.round
    codes = np.clip(rounded + 8, 0, 15).astype(np.uint8)
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8), scales


def _quantize_source(n: int, k: int, output: str) -> str:
    """TVMScript of a PrimFunc W [n, k] -> codes [n, k/32, 16] ("codes") or scales [n, k/32]."""
    blocks = k // BLOCK
    shape = f"(T.int64({n}), T.int64({blocks}), T.int64(16))" if output == "codes" else \
        f"(T.int64({n}), T.int64({blocks}))"  # fmt: skip
    dtype = "uint8" if output == "codes" else "float32"

    def code(offset: str) -> str:
        return (f"T.max(T.min(T.round(w[i, b * T.int64({BLOCK}) + j{offset}] * inverse) + T.float32(8), "
                "T.float32(15)), T.float32(0))")  # fmt: skip

    low, high = code(""), code(" + T.int64(16)")
    store = (f"        for j in range(T.int64(16)):\n"
             f"            out[i, b, j] = T.Cast('uint8', {low}) + T.Cast('uint8', {high}) * T.uint8(16)"
             ) if output == "codes" else "        out[i, b] = scale"  # fmt: skip
    return "\n".join([
        "@T.prim_func(private=True)",
        f"def int4_{output}(var_w: T.handle, var_out: T.handle):",
        f"    T.func_attr({ATTRS})",
        f"    w = T.match_buffer(var_w, (T.int64({n}), T.int64({k})), 'float32')",
        f"    out = T.match_buffer(var_out, {shape}, '{dtype}')",
        "    with T.sblock('root'):",
        f"      for i, b in T.grid(T.int64({n}), T.int64({blocks})):",
        "        top = T.decl_buffer((1,), 'float32', scope='local')",
        "        low = T.decl_buffer((1,), 'float32', scope='local')",
        "        top[0] = T.float32(0)",
        "        low[0] = T.float32(0)",
        f"        for j in range(T.int64({BLOCK})):",
        f"            top[0] = T.max(top[0], w[i, b * T.int64({BLOCK}) + j])",
        f"            low[0] = T.min(low[0], w[i, b * T.int64({BLOCK}) + j])",
        "        scale = T.if_then_else(top[0] >= -low[0], top[0], low[0]) / T.float32(-8)",
        "        inverse = T.if_then_else(scale == T.float32(0), T.float32(0), T.float32(1) / scale)",
        store,
    ])  # fmt: skip


def _matmul_source(x: relax.TensorType, n: int, k: int) -> str:
    """TVMScript of a PrimFunc x [..., k], codes, scales -> y [..., n] calling the kernel."""
    symbols: dict[str, str] = {}
    x_dims = shape_script(x.shape, symbols)
    leading = x_dims.strip("()").rstrip(",").split(", ")[:-1]
    y_dims = "(" + ", ".join([*leading, str(n)]) + ("," if not leading else "") + ")"
    rows = " * ".join(leading) or "1"
    return "\n".join([
        "@T.prim_func(private=True)",
        "def int4_matmul(var_x: T.handle, var_codes: T.handle, var_scales: T.handle, var_y: T.handle):",
        f"    T.func_attr({ATTRS})",
        *(f"    {name} = T.int64()" for name in symbols.values()),
        f"    x = T.match_buffer(var_x, {x_dims}, 'float32')",
        f"    codes = T.match_buffer(var_codes, ({n}, {k // BLOCK}, 16), 'uint8')",
        f"    scales = T.match_buffer(var_scales, ({n}, {k // BLOCK}), 'float32')",
        f"    y = T.match_buffer(var_y, {y_dims}, 'float32')",
        "    with T.sblock('root'):",
        f"        T.evaluate(T.call_extern('int32', '{KERNEL_SYMBOL}', T.Cast('int32', {rows}), {k}, {n}, "
        "codes.data, scales.data, x.data, y.data, 0))",
    ])  # fmt: skip


@dataclass(frozen=True)
class Int4Choice:
    """Which weights to quantise: 2-D weight arguments with K % 64 == 0, the head only if `head`."""

    head: bool
    vocab_size: int

    def takes(self, weight: relax.Expr) -> bool:
        shape = weight.ty.shape.values if isinstance(weight.ty, relax.TensorType) else None
        if shape is None or len(shape) != 2 or not all(isinstance(d, tir.IntImm) for d in shape):
            return False
        n, k = (int(d) for d in shape)
        return k % K_MULTIPLE == 0 and (self.head or n != self.vocab_size) and weight.ty.dtype == "float32"


def _weights(function: relax.Function) -> set[relax.Var]:
    count = function.attrs.get("num_input") if function.attrs is not None else None
    return set(function.params[int(count):]) if count is not None else set()


@relax.expr_functor.mutator
class _Int4Rewriter(relax.PyExprMutator):
    def __init__(self, module: tvm.IRModule, choice: Int4Choice):
        super().__init__(module)
        self.choice = choice
        self.functions: dict[str, relax.GlobalVar] = {}
        self.weights: set[relax.Var] = set()
        self.transposes: dict[relax.Var, relax.Var] = {}  # permute_dims(W) binding -> W
        self.rewritten: dict[str, int] = {}  # function -> matmuls rewritten
        self.current = ""

    def _function(self, source: str, name: str) -> relax.GlobalVar:
        if source not in self.functions:
            self.functions[source] = self.builder_.add_func(from_source(source), name)
        return self.functions[source]

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        if isinstance(value, relax.Call) and value.op == PERMUTE_DIMS and value.args[0] in self.weights:
            axes = value.attrs.axes
            if axes is None or [int(a) for a in axes] == [1, 0]:
                self.transposes[binding.var] = value.args[0]
        if not (isinstance(value, relax.Call) and value.op == MATMUL and value.args[1] in self.transposes):
            return super().visit_var_binding_(binding)
        weight = self.transposes[value.args[1]]
        if not self.choice.takes(weight) or value.args[0].ty.dtype != "float32":
            return super().visit_var_binding_(binding)
        n, k = (int(d) for d in weight.ty.shape.values)
        codes_fn = self._function(_quantize_source(n, k, "codes"), "int4_codes")
        scales_fn = self._function(_quantize_source(n, k, "scales"), "int4_scales")
        codes_type = relax.TensorType([n, k // BLOCK, 16], "uint8")
        scales_type = relax.TensorType([n, k // BLOCK], "float32")
        codes = self.builder_.emit(relax.call_tir(codes_fn, [weight], codes_type))
        scales = self.builder_.emit(relax.call_tir(scales_fn, [weight], scales_type))
        x = self.visit_expr(value.args[0])
        matmul = self._function(_matmul_source(x.ty, n, k), "int4_matmul")
        call = relax.call_tir(matmul, [x, codes, scales], binding.var.ty)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))
        self.rewritten[self.current] = self.rewritten.get(self.current, 0) + 1

    def rewrite(self) -> tvm.IRModule:
        for global_var, function in self.builder_.get().functions_items():
            if isinstance(function, relax.Function):
                self.weights, self.transposes, self.current = _weights(function), {}, global_var.name_hint
                self.builder_.update_func(global_var, self.visit_expr(function))
        return self.builder_.get()


def quantize_matmuls(module: tvm.IRModule, choice: Int4Choice) -> tuple[tvm.IRModule, int]:
    """Every Relax function's `matmul(x, permute_dims(W))` of a chosen weight argument -> the int4
    kernel; returns the module (dead transposes removed) and how many matmuls a function had rewritten."""
    rewriter = _Int4Rewriter(module, choice)
    module = rewriter.rewrite()
    entries = [gv.name_hint for gv, f in module.functions.items() if isinstance(f, relax.Function)]
    return relax.transform.DeadCodeElimination(entries)(module), max(rewriter.rewritten.values(), default=0)
