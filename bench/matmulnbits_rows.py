"""ORT's int4 MatMulNBits: which row counts give bit-identical rows, and what each row count costs.

One MatMulNBits node with random int4 weights (SmolLM2-135M's MLP shapes by default: K=576,
N=1536; Qwen2.5-Coder-1.5B's with --shape 1536x8960), block 32 and 128, zero points, int8
activations (accuracy_level 4, the fast path) and float activations (accuracy_level 0). For
each row count M, every row of an M-row call is compared bit for bit with the same row of a
--max-rows call (batch invariance: what a lossless speculative verify step needs), and the call
is timed (median of --repeats, after warm-up). Threads pinned by the session options (1 and 2).
Writes bench/results/matmulnbits_rows.{json,md}.

    .venv/bin/python bench/matmulnbits_rows.py [--shape 576x1536] [--max-rows 34] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

RESULTS = Path(__file__).parent / "results"
ROWS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33)


def matmul_nbits(k: int, n: int, block: int, accuracy: int) -> bytes:
    """A one-node model: Y[M, n] = A[M, k] @ dequant(B), B random int4 with scales and zero points."""
    blocks, rng = -(-k // block), np.random.default_rng(0)  # the last block is zero-padded
    weights = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zero_points = rng.integers(0, 256, (n * ((blocks + 1) // 2),), dtype=np.uint8)
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=block, accuracy_level=accuracy)  # fmt: skip
    graph = helper.make_graph(
        [node], "matmul_nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(weights, "B"), numpy_helper.from_array(scales, "S"),
         numpy_helper.from_array(zero_points, "Z")])  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def measure(k: int, n: int, block: int, accuracy: int, threads: int, max_rows: int, repeats: int) -> dict:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(matmul_nbits(k, n, block, accuracy), options,
                                           providers=["CPUExecutionProvider"])  # fmt: skip
    inputs = np.random.default_rng(1).standard_normal((max_rows, k)).astype(np.float32)
    reference = session.run(None, {"A": inputs})[0]
    rows = {}
    for m in (*ROWS, max_rows):
        out = session.run(None, {"A": inputs[:m]})[0]
        same = [bool(np.array_equal(out[i], reference[i])) for i in range(m)]
        for _ in range(5):
            session.run(None, {"A": inputs[:m]})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, {"A": inputs[:m]})
            times.append((time.perf_counter() - start) * 1000)
        rows[m] = {"rows_identical": all(same), "max_abs_diff": float(np.abs(out - reference[:m]).max()),
                   "ms": statistics.median(times)}  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="576x1536", help="KxN of the weight")
    parser.add_argument("--max-rows", type=int, default=34)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    k, n = (int(x) for x in args.shape.split("x"))
    runs = []
    for threads in (1, 2):
        for block in (32, 128):
            for accuracy in (4, 0):
                rows = measure(k, n, block, accuracy, threads, args.max_rows, args.repeats)
                runs.append({"threads": threads, "block": block, "accuracy_level": accuracy, "rows": rows})
                invariant = [m for m, r in rows.items() if r["rows_identical"]]
                print(f"threads {threads} block {block} accuracy {accuracy}: identical rows for M in "
                      f"{invariant}; M=1 {rows[1]['ms']:.3f} ms, M=2 {rows[2]['ms']:.3f} ms", flush=True)
    record = {"shape": [k, n], "max_rows": args.max_rows, "onnxruntime": onnxruntime.__version__,
              "machine": platform.processor() or platform.machine(), "runs": runs}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "matmulnbits_rows.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# MatMulNBits int4 rows: K={k}, N={n}, onnxruntime {onnxruntime.__version__}", "",
             f"Each M: every row equal (bit for bit) to the same row of an M={args.max_rows} call? "
             "Time: median ms of the call, T(M)/T(1) in brackets.", "",
             "| threads | block | accuracy | " + " | ".join(f"M={m}" for m in ROWS) + " |",
             "|---|---|---|" + "---|" * len(ROWS)]  # fmt: skip
    for run in runs:
        base = run["rows"][1]["ms"]
        cells = [f"{'=' if r['rows_identical'] else 'DIFF'} {r['ms']:.3f} ({r['ms'] / base:.2f})"
                 for m, r in run["rows"].items() if m in ROWS]  # fmt: skip
        head = f"| {run['threads']} | {run['block']} | {run['accuracy_level']} | "
        lines.append(head + " | ".join(cells) + " |")
    (RESULTS / "matmulnbits_rows.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
