"""Which int4 weight format decodes fastest with ORT's MatMulNBits: block size x zero points x
activation precision, timed on a whole model's worth of matmuls.

One graph holds every weight matmul of a decoder of the given shape (per layer: packed q|k|v, o,
packed gate|up, down; then the output head), each with its own random int4 weights, so the step
reads as many weight bytes as the real model does. Formats: block 32/64/128/256, with zero points
(asymmetric, what `--quantize int4` writes today) or without (symmetric: MLAS assumes 8), int8
activations (accuracy_level 4) or float (0). For M = 1, 2, 3, 5 rows the graph is timed (median of
--repeats, after warm-up; threads pinned by the session options) and, per format, every row of
the 2..8-row calls is compared bit for bit with the same row of an 8-row call.
Writes bench/results/matmulnbits_formats.{json,md}.

    .venv/bin/python bench/matmulnbits_formats.py [--model smollm2-135m] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from skiptree.runtime.device import cpu_model

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # hidden, q|k|v out, intermediate, layers, vocab (the models' configurations)
    "smollm2-135m": (576, 576 + 2 * 192, 1536, 30, 49152),
    "qwen2.5-coder-1.5b": (1536, 1536 + 2 * 256, 8960, 28, 151936),
}
ROWS = (1, 2, 3, 5)


def matmuls(hidden: int, qkv: int, inter: int, layers: int, vocab: int) -> list[tuple[str, int, int]]:
    per_layer = [
        ("qkv", hidden, qkv),
        ("o", hidden, hidden),
        ("gate_up", hidden, 2 * inter),
        ("down", inter, hidden),
    ]
    return [(f"{name}{i}", k, n) for i in range(layers) for name, k, n in per_layer] + [
        ("head", hidden, vocab)
    ]


def model_bytes(shapes: list[tuple[str, int, int]], block: int, symmetric: bool, accuracy: int) -> bytes:
    rng = np.random.default_rng(0)
    nodes, initializers, outputs = [], [], []
    inputs = sorted({k for _, k, _ in shapes})
    for name, k, n in shapes:
        blocks = -(-k // block)
        initializers.append(
            numpy_helper.from_array(
                rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), f"{name}_B"
            )
        )
        scales = (rng.random(n * blocks, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
        initializers.append(numpy_helper.from_array(scales, f"{name}_S"))
        node_inputs = [f"A{k}", f"{name}_B", f"{name}_S"]
        if not symmetric:
            zero_points = rng.integers(0, 256, (n * ((blocks + 1) // 2),), dtype=np.uint8)
            initializers.append(numpy_helper.from_array(zero_points, f"{name}_Z"))
            node_inputs.append(f"{name}_Z")
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                node_inputs,
                [f"{name}_Y"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=accuracy,
            )
        )
        outputs.append(helper.make_tensor_value_info(f"{name}_Y", TensorProto.FLOAT, ["M", n]))
    graph = helper.make_graph(
        nodes,
        "formats",
        [helper.make_tensor_value_info(f"A{k}", TensorProto.FLOAT, ["M", k]) for k in inputs],
        outputs,
        initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def measure(shapes, block: int, symmetric: bool, accuracy: int, threads: int, repeats: int) -> dict:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(
        model_bytes(shapes, block, symmetric, accuracy), options, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(1)
    feeds = {
        i.name: rng.standard_normal((8, int(i.name[1:]))).astype(np.float32) for i in session.get_inputs()
    }
    head = len(shapes) - 1  # compare the head's logits: the output a verify step's argmax reads
    reference = session.run(None, feeds)[head]
    invariant = all(
        np.array_equal(session.run(None, {n: v[:m] for n, v in feeds.items()})[head], reference[:m])
        for m in range(2, 8)
    )
    one_row_same = bool(
        np.array_equal(session.run(None, {n: v[:1] for n, v in feeds.items()})[head], reference[:1])
    )
    times = {}
    for m in ROWS:
        part = {n: v[:m] for n, v in feeds.items()}
        for _ in range(3):
            session.run(None, part)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, part)
            samples.append(time.perf_counter() - start)
        times[m] = statistics.median(samples) * 1000
    return {
        "block": block,
        "symmetric": symmetric,
        "accuracy": accuracy,
        "threads": threads,
        "ms": times,
        "rows_2_to_8_invariant": invariant,
        "one_row_equals_multi_row": one_row_same,
    }


def markdown(model: str, results: list[dict]) -> str:
    lines = [
        f"# int4 MatMulNBits formats: every weight matmul of {model}, random weights",
        "",
        f"CPU: {cpu_model()}; onnxruntime {onnxruntime.__version__}; "
        "median ms per call of all the matmuls (one decode step's weight reads); T(M)/T(1) in brackets.",
        "",
        "| threads | block | zero points | activations | M=1 | M=2 | M=3 | M=5 | rows 2..8 invariant "
        "| 1 row = multi-row |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        one = r["ms"][1]
        cells = [f"{r['ms'][m]:.2f}" + ("" if m == 1 else f" ({r['ms'][m] / one:.2f})") for m in ROWS]
        lines.append(
            f"| {r['threads']} | {r['block']} | {'no' if r['symmetric'] else 'yes'} | "
            f"{'int8' if r['accuracy'] == 4 else 'float32'} | "
            + " | ".join(cells)
            + f" | {r['rows_2_to_8_invariant']} | {r['one_row_equals_multi_row']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--blocks", default="32,64,128,256")
    parser.add_argument("--accuracy", default="4,0")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    shapes = matmuls(*SHAPES[args.model])
    results = []
    for threads in (int(t) for t in args.threads.split(",")):
        for accuracy in (int(a) for a in args.accuracy.split(",")):
            for block in (int(b) for b in args.blocks.split(",")):
                for symmetric in (True, False):
                    results.append(measure(shapes, block, symmetric, accuracy, threads, args.repeats))
                    print(json.dumps(results[-1]), flush=True)
    stem = "matmulnbits_formats" + ("" if args.model == "smollm2-135m" else f"_{args.model}")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"model": args.model, "results": results}, indent=1))
    (RESULTS / f"{stem}.md").write_text(markdown(args.model, results))


if __name__ == "__main__":
    main()
