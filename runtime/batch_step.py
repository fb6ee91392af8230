"""One verify call for many requests: a batched verify graph over a KV cache with one row per request.

An artifact compiled with `--max-batch N` has a verify graph that takes `tokens [B, T]`, `parents
[B, T]` and `prefix_len [B]`: a tree per cache row, every row computed as it would be alone (its own
attention over its own row; the matmuls' rows do not depend on their call's size: see
`pad_lone_rows`). `BatchRows` owns the cache `[L, N, Hkv, S, D]` and calls the graph on a run of
consecutive rows, bound by pointer (rows `lo..hi` of a layer are one contiguous block), so a prefill
chunk runs on its request's row alone and a decode step on the rows of every decoding request.
Compaction after acceptance and moving a request to another row are copies on the host: a few
slots per layer, or one row's used slots.
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.onnx_step import MLAS_ROW_RANGE, KVCache, OnnxGraph, SessionConfig


class BatchRows:
    """A batched verify graph and its cache of `rows` requests (`lengths[r]`: slots row r holds)."""

    def __init__(self, graph_path, signature: dict, rows: int, config: SessionConfig,
                 pads_lone_rows: bool = False):  # fmt: skip
        self.cache = KVCache(signature, batch=rows)
        self.graph = OnnxGraph(graph_path, self.cache, config)
        if not self.graph.batched:
            raise ValueError("the verify graph takes one tree per call; recompile with --max-batch N")
        self.rows, self.max_seq_len = rows, self.cache.max_seq_len
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.pads_lone_rows = pads_lone_rows

    def _bind(self, lo: int, hi: int) -> None:
        if self.graph.rows != (lo, hi):
            self.graph.bind_rows(lo, hi)

    def run(self, lo: int, tokens: np.ndarray, parents: np.ndarray, outputs: tuple[str, ...]) -> list:
        """Trees `tokens [b, T]`, `parents [b, T]` (verify numbering, node 0 the root) on rows lo..lo+b-1
        after their cached slots; their K/V land at slots length..length+T-1 (the caller commits what
        it keeps with `commit`). Returns the requested outputs [b, T, ...]."""
        rows, steps = tokens.shape
        prefix = self.lengths[lo : lo + rows]
        lone = self.pads_lone_rows and (rows * steps) % MLAS_ROW_RANGE == 1
        if lone and int(prefix.max()) + steps + 1 <= self.max_seq_len:  # see pad_lone_rows (room permitting)
            tokens = np.concatenate([tokens, tokens[:, :1]], axis=1)
            parents = np.concatenate([parents, np.zeros((rows, 1), dtype=np.int64)], axis=1)
        if int(prefix.max()) + tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens overflow a row of {self.max_seq_len} slots")
        self._bind(lo, lo + rows)
        inputs = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64),
                  "parents": np.ascontiguousarray(parents, dtype=np.int64),
                  "prefix_len": np.ascontiguousarray(prefix, dtype=np.int64)}  # fmt: skip
        values = self.graph._run(inputs, outputs)
        return [value[:, :steps] for value in values]

    def commit(self, row: int, accepted: list[int]) -> None:
        """After a tree on `row`: keep its root and the accepted nodes (verify numbering), in order."""
        start = int(self.lengths[row])
        moves = [(start + node, start + j) for j, node in enumerate(accepted, start=1) if node != j]
        if moves:
            sources, targets = (list(side) for side in zip(*moves, strict=True))
            for buffer in (self.cache.k, self.cache.v):
                buffer[:, row, :, targets] = buffer[:, row, :, sources]
        self.lengths[row] = start + 1 + len(accepted)

    def move(self, source: int, target: int) -> None:
        """Row `source`'s cached slots to row `target` (whose own slots are dropped)."""
        used = int(self.lengths[source])
        for buffer in (self.cache.k, self.cache.v):
            buffer[:, target, :, :used] = buffer[:, source, :, :used]
        self.lengths[target], self.lengths[source] = used, 0

    def swap(self, first: int, second: int) -> None:
        used = int(max(self.lengths[first], self.lengths[second]))
        for buffer in (self.cache.k, self.cache.v):
            held = buffer[:, first, :, :used].copy()
            buffer[:, first, :, :used] = buffer[:, second, :, :used]
            buffer[:, second, :, :used] = held
        self.lengths[[first, second]] = self.lengths[[second, first]]
