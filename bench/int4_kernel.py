"""A batch-invariant int4 kernel with cheap extra rows: how fast could an own kernel be here?

`bench/int4_kernel.c` (AVX2, one thread) multiplies int8 activations (one scale per row) by
symmetric int4 weights (block 32) with vpmaddubsw, one block a step or two (a 32-byte load of two
blocks' codes, the activations stored in the matching order): the weights are unpacked once and
used by every row, and each row runs the same instructions whatever the row count, so rows are
bit-identical alone or in a batch. It is compiled here with the system's gcc (a measurement, not
part of skiptree) and timed on every weight matmul of a model (random weights, each matmul its
own, so a call streams a step's weights from memory) for M = 1, 2, 3, 5, 8 rows, side by side with
ORT's MatMulNBits (symmetric block 32, int8 activations: skiptree's default int4) on the same
shapes. Also: rows of 1..8-row calls against the same rows of an 8-row call (bit for bit), and
each kernel's error against float32 on the dequantised weights.
Writes bench/results/int4_kernel.{json,md}.

    .venv/bin/python bench/int4_kernel.py [--model smollm2-135m] [--repeats 15]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from skiptree.runtime.device import cpu_model

sys.path.insert(0, str(Path(__file__).parent))
from matmulnbits_formats import SHAPES, matmuls, measure  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROWS = (1, 2, 3, 5, 8)
KERNELS = {  # name -> the kernel argument of int4_model
    "ours, one block a step, a scale a row": 0,
    "ours, two blocks a step, a scale a row": 1,
    "ours, two blocks a step, a scale a block (as MLAS)": 2,
    "the same, two output columns a pass": 3,
}
BLOCK = 32


def build(work: Path) -> ctypes.CDLL:
    source = Path(__file__).with_suffix(".c")
    library = work / "int4_kernel.so"
    if not library.exists() or library.stat().st_mtime < source.stat().st_mtime:
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["gcc", "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-o", str(library), str(source)], check=True
        )
    return ctypes.CDLL(str(library))


def pointer(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)


class Model:
    """Random int4 weights for every matmul of a model, and the buffers of one call of M rows."""

    def __init__(self, lib: ctypes.CDLL, shapes: list[tuple[str, int, int]], max_rows: int):
        rng = np.random.default_rng(0)
        self.lib, self.shapes = lib, shapes
        self.codes = [rng.integers(0, 256, (n, k // BLOCK, 16), dtype=np.uint8) for _, k, n in shapes]
        self.scales = [(rng.random((n, k // BLOCK), dtype=np.float32) * 0.02 + 0.001) for _, k, n in shapes]
        self.bias = [np.zeros(n, np.float32) for _, _, n in shapes]
        for (_, k, n), codes, scales, bias in zip(shapes, self.codes, self.scales, self.bias, strict=True):
            lib.int4_bias(k, n, pointer(codes), pointer(scales), pointer(bias))
        inputs = {k: rng.standard_normal((max_rows, k)).astype(np.float32) for k in {k for _, k, _ in shapes}}
        self.x = [inputs[k] for _, k, _ in shapes]
        self.y = [np.zeros((max_rows, n), np.float32) for _, _, n in shapes]
        self.xu = np.zeros(max_rows * max(k for _, k, _ in shapes), np.uint8)
        largest = max(k for _, k, _ in shapes)
        self.xs = np.zeros(max_rows * largest // 8, np.float32)  # per row, or per row and block pair x 8
        self.offsets = np.zeros(max_rows * largest // 8, np.int32)
        count = len(shapes)
        array = ctypes.c_void_p * count
        self.args = [
            count,
            (ctypes.c_int * count)(*[k for _, k, _ in shapes]),
            (ctypes.c_int * count)(*[n for _, _, n in shapes]),
            array(*[c.ctypes.data for c in self.codes]),
            array(*[s.ctypes.data for s in self.scales]),
            array(*[b.ctypes.data for b in self.bias]),
            array(*[x.ctypes.data for x in self.x]),
            array(*[y.ctypes.data for y in self.y]),
        ]

    def run(self, rows: int, kernel: int) -> list[np.ndarray]:
        scratch = (pointer(self.xu), pointer(self.offsets), pointer(self.xs))
        self.lib.int4_model(*self.args, rows, *scratch, kernel)
        return [y[:rows].copy() for y in self.y]

    def dequantized(self, index: int) -> np.ndarray:
        """[N, K] float weights of matmul `index` (element j low nibble, j + 16 high, minus 8)."""
        codes = self.codes[index]
        values = np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.float32) - 8
        return (values * self.scales[index][..., None]).reshape(codes.shape[0], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--work", type=Path, default=Path("bench/.work/int4_kernel"))
    args = parser.parse_args()
    shapes = matmuls(*SHAPES[args.model])
    model = Model(build(args.work), shapes, max(ROWS))
    head = len(shapes) - 1
    exact = model.x[head][: max(ROWS)] @ model.dequantized(head).T
    kernels = {}
    for name, kernel in KERNELS.items():
        reference = model.run(max(ROWS), kernel)
        invariant = {}  # rows of an M-row call == the same rows of the 8-row call, bit for bit
        for m in range(1, max(ROWS) + 1):
            outputs = zip(model.run(m, kernel), reference, strict=True)
            invariant[m] = all(np.array_equal(got, ref[:m]) for got, ref in outputs)
        times = {}
        for m in ROWS:
            for _ in range(3):
                model.run(m, kernel)
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.run(m, kernel)
                samples.append(time.perf_counter() - start)
            times[m] = statistics.median(samples) * 1000
        error = float(np.abs(reference[head] - exact).max() / np.abs(exact).max())
        kernels[name] = {"ms": times, "rows_invariant": invariant, "head_error": error}
    mlas = measure(shapes, BLOCK, True, 4, 1, args.repeats)  # ORT, same shapes, M = 1, 2, 3, 5
    record = {
        "model": args.model,
        "cpu": cpu_model(),
        "repeats": args.repeats,
        "ours": kernels,
        "mlas": mlas,
    }
    RESULTS.joinpath("int4_kernel.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"# A batch-invariant int4 x int8 kernel vs ORT MatMulNBits: every weight matmul of {args.model}",
        "",
        f"CPU: {record['cpu']}; 1 thread; random symmetric int4 weights, block 32; median of {args.repeats} "
        "calls of all the matmuls (one step's weights, cold); T(M)/T(1) in brackets.",
        "",
        "| kernel | " + " | ".join(f"M={m}" for m in ROWS) + " | rows bit-identical at any M | head error |",
        "|---|" + "---|" * len(ROWS) + "---|---|",
    ]

    def cells(times: dict) -> str:
        one = times[1]
        return " | ".join(
            f"{times[m]:.2f}" + ("" if m == 1 else f" ({times[m] / one:.2f})") if m in times else "-"
            for m in ROWS
        )

    for name, entry in kernels.items():
        invariant = all(entry["rows_invariant"].values())
        lines.append(f"| {name} | {cells(entry['ms'])} | {invariant} | {entry['head_error']:.1e} |")
    mlas_ms = {int(m): t for m, t in mlas["ms"].items()}
    lines.append(f"| ORT MatMulNBits (int8 blocks of 32) | {cells(mlas_ms)} | 2..8 rows only | |")
    RESULTS.joinpath("int4_kernel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
