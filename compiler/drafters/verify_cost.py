"""Measure the verify step's cost T(n) at compile time, for the free drafters' per-step gate.

The lowered verify graph runs on the compiling machine (the artifact's own threads) after a
`prefix`-token context, with chains of n draft nodes (n + 1 tokens with the root), sizes
interleaved, median of `repeats`, fitted nondecreasing. Stored as T(n) / T(0) in the manifest
(`speculative.verify_cost`); T(0) is the plain step (the same graph with the root alone). A few
seconds for a 135M model, about two minutes for a 1.5B one. Where the decoder pads a one-row call
to two rows (int8 activations: `pad_lone_rows`), T(0) is measured padded, as the decoder pays it,
and the cost is marked `paired`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from skiptree.models.config import ModelConfig
from skiptree.runtime.artifact import open_backend, step_model_of
from skiptree.runtime.manifest import BackendEntry, DecodeMode, GraphEntry, VerifyCostEntry
from skiptree.runtime.onnx_step import SessionConfig, pad_lone_rows

COST_NODES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def nondecreasing(values: list[float]) -> list[float]:
    """The least-squares nondecreasing fit (pooled adjacent violators): a noisy high reading is
    averaged with its neighbours instead of raising every larger size to it (a running max did)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (mean, count), (last, size) = blocks[-2], blocks.pop()
            blocks[-1] = [(mean * count + last * size) / (count + size), count + size]
    return [mean for mean, count in blocks for _ in range(int(count))]


def measure_verify_cost(folder: Path, graphs: Mapping[str, GraphEntry], backend: BackendEntry,
                        max_tree: int, config: ModelConfig, threads: int, repeats: int = 5
                        ) -> VerifyCostEntry:  # fmt: skip
    """T(n) / T(0) of the verify graph in the artifact being built (`graphs`, lowered for `backend`),
    as speculative decoding with trees of up to `max_tree` tokens calls it."""
    opened = open_backend(folder, backend, graphs, SessionConfig(threads=threads))
    step = step_model_of(opened, graphs, DecodeMode.SPECULATIVE, config.num_layers, max_tree)
    graph, max_seq_len = step.graph, step.max_seq_len
    largest = min(max_tree, getattr(step, "max_tree", 64)) - 1
    paired = getattr(step, "pads_lone_rows", False)
    nodes = sorted(set(COST_NODES) & set(range(1, largest + 1)))
    prefix = min(128, max_seq_len - (max(nodes, default=0) + 1))
    vocab = config.vocab_size
    step.prefill([(7 * i + 3) % vocab for i in range(prefix)])

    def verify(n: int) -> None:
        step.cache.length = prefix
        inputs = {"tokens": np.full((1, n + 1), 5, dtype=np.int64),
                  "parents": np.maximum(np.arange(n + 1, dtype=np.int64) - 1, 0),
                  "prefix_len": np.asarray([prefix], dtype=np.int64)}  # fmt: skip
        if paired:
            pad_lone_rows(inputs, step.max_tree)
        graph.run(inputs, ("next_ids",))

    sizes = [0, *nodes]
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for rep in range(repeats + 1):  # the first round warms up each size
        for n in sizes[rep % len(sizes) :] + sizes[: rep % len(sizes)]:
            start = time.perf_counter()
            verify(n)
            if rep:
                times[n].append(1000 * (time.perf_counter() - start))
    medians = {n: statistics.median(t) for n, t in times.items()}
    ratios = nondecreasing([medians[n] / medians[0] for n in nodes])  # more nodes never cost less
    return VerifyCostEntry(prefix=prefix, plain_ms=round(medians[0], 3), nodes=tuple(nodes),
                           ratio=tuple(round(float(r), 4) for r in ratios), paired=paired)  # fmt: skip
