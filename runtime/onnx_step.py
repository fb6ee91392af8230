"""Run lowered graphs with ONNX Runtime over one shared, in-place KV cache.

The cache lives in two numpy buffers `[L, B, Hkv, S, D]` owned by `KVCache`. Every graph of a
model (step, verify, compact) binds each layer's slice by pointer as input `k{i}` / `v{i}` *and*
as output `k{i}_out` / `v{i}_out`: ORT's ScatterND then updates the cache in place, so no call
copies the cache, through numpy or otherwise (`test_cache_is_updated_in_place` watches for that
ORT behaviour changing). Only the outputs a caller asks for are bound and fetched: greedy
decoding fetches `next_ids` and never the `[T, vocab]` logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class SessionConfig:
    """How to run the graphs: threads (0 = ORT's default), optimisation level, providers, and two
    memory knobs (what each costs: bench/results/session_memory.md): `prepacking` (ORT copies
    constant weights into its kernels' layouts at load), `memory_arena` (ORT's CPU arena keeps
    freed activation buffers for reuse)."""

    threads: int = 0
    optimization_level: str = "extended"  # measured: "all" gains nothing on CPU here
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    prepacking: bool = True
    memory_arena: bool = True
    spinning: bool = True  # ORT's pool threads spin between calls (off: they sleep, and leave the cores free)


def make_session(path: Path, config: SessionConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[config.optimization_level]
    if config.threads:
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not config.prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = config.memory_arena
    if not config.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=list(config.providers))


BATCHED = ("logits", "features")  # verify outputs with a batch dim, dropped by VerifyStepModel


MLAS_ROW_RANGE = 128  # MLAS splits a threaded MatMulNBits call into ranges of this many rows


def pad_lone_rows(inputs: dict[str, np.ndarray], room: int) -> None:
    """When a call would hand ORT's MatMulNBits a lone row (one row, or 128k + 1 rows, whose last
    128-row range is one row when threads split it) and `room` (the most rows the call may have:
    free cache slots, the graph's largest tree) allows one more, a throw-away node (a copy of the
    root, its child) is appended to the verify inputs in place. Why: MLAS sends a one-row range
    to a GEMV kernel that rounds differently from its multi-row kernel, while every row of a call
    of 2 or more rows is bit for bit the same whatever the call's size or the row's place
    (bench/results/matmulnbits_rows.md). With no lone row, a chain verifies exactly what plain
    decoding computes. (A branching tree still can differ: a node whose ancestors are not in
    consecutive slots sums attention in another order, and int8 rounding amplifies that.) The
    extra node's K/V lands past the tree, where nothing reads it before the next step overwrites
    it; its outputs are cut by `first_rows`."""
    if "tokens" not in inputs:  # a prefix exit's hidden states: not padded (float drafts only)
        return
    rows = inputs["tokens"].shape[1]
    if rows % MLAS_ROW_RANGE == 1 and room >= rows + 1:
        inputs["tokens"] = np.concatenate([inputs["tokens"], inputs["tokens"][:, :1]], axis=1)
        inputs["parents"] = np.append(inputs["parents"], 0)


def first_rows(name: str, value: np.ndarray, rows: int) -> np.ndarray:
    """A verify output cut to the tree's own `rows` (its batch dim kept)."""
    return value[:, :rows] if name in BATCHED else value[:rows]


def is_cache(name: str) -> bool:
    return name[:1] in ("k", "v") and name[1:].isdigit()


class KVCache:
    """The K and V buffers of one model, `[L, B, Hkv, S, D]`, and how many slots are filled."""

    def __init__(self, signature: dict, num_layers: int | None = None, batch: int = 1):
        """Shaped like the cache inputs of a graph's `signature`; `num_layers` when the graph runs
        only some of the model's layers; `batch` rows when the graph takes a batch ("B")."""
        specs = [spec for spec in signature["inputs"] if is_cache(spec["name"])]
        self.num_layers = num_layers or len(specs) // 2
        self.layer_shape = [batch if d == "B" else int(d) for d in specs[0]["shape"]]  # [B, Hkv, S, D]
        self.max_seq_len = self.layer_shape[2]
        self.dtype = np.dtype(specs[0]["dtype"])
        self.k = np.zeros((self.num_layers, *self.layer_shape), self.dtype)
        self.v = np.zeros_like(self.k)
        self.length = 0

    def layers(self):
        for layer in range(self.num_layers):
            yield f"k{layer}", self.k[layer]
            yield f"v{layer}", self.v[layer]


class OnnxGraph:
    """One ORT session whose cache inputs/outputs are bound to a shared `KVCache`. A graph that runs
    some layers only (a self-draft, a verify graph from an exit layer) binds those layers' buffers."""

    def __init__(self, path: Path, cache: KVCache, config: SessionConfig):
        self.session = make_session(path, config)
        self.session_inputs = [spec.name for spec in self.session.get_inputs()]
        self.cache = cache
        self.binding = self.session.io_binding()
        self.cache_layers = [(name, buffer) for name, buffer in cache.layers() if name in self.session_inputs]
        self.bound_outputs: tuple[str, ...] | None = None  # the requested outputs bound after the cache's
        self.bind_rows(0, cache.layer_shape[0])
        ranks = {spec.name: len(spec.shape) for spec in self.session.get_inputs()}
        self.batched = ranks.get("parents") == 2  # a batch of trees: one per cache row (`skiptree serve`)

    def run(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        """Run with the given non-cache inputs; returns the requested outputs, in order. A batched
        verify graph called with one tree (`parents` [T]) runs it as a batch of one, answered as one."""
        single = self.batched and "parents" in inputs and inputs["parents"].ndim == 1
        if single:
            inputs = {**inputs, "parents": inputs["parents"][None]}
        values = self._run(inputs, outputs)
        return [value[0] if single and name == "next_ids" else value
                for name, value in zip(outputs, values, strict=True)]  # fmt: skip

    def bind_rows(self, lo: int, hi: int) -> None:
        """Bind the cache's rows lo..hi-1 (one contiguous block per layer) as the graph's cache."""
        self.rows, shape = (lo, hi), [hi - lo, *self.cache.layer_shape[1:]]
        self.binding.clear_binding_inputs()
        for name, buffer in self.cache_layers:
            self.binding.bind_input(name, "cpu", 0, self.cache.dtype, shape, buffer[lo].ctypes.data)
        self.bound_outputs = None

    def _run(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        for name, value in inputs.items():
            self.binding.bind_cpu_input(name, value)
        if outputs != self.bound_outputs:  # the cache's outputs stay bound while the request is the same
            self.binding.clear_binding_outputs()
            lo, hi = self.rows
            shape = [hi - lo, *self.cache.layer_shape[1:]]
            for name, buffer in self.cache_layers:
                self.binding.bind_output(f"{name}_out", "cpu", 0, self.cache.dtype, shape,
                                         buffer[lo].ctypes.data)  # fmt: skip
            self.bound_outputs = outputs
        for name in outputs:  # re-bound every call (in place): ORT keeps the last run's shapes otherwise
            self.binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self.binding)
        # The raw vector, not `get_outputs()`, which wraps every cache output too (measured ~0.3 ms a step).
        fetched = self.binding._iobinding.get_outputs()
        return [fetched[i].numpy() for i in range(len(self.cache_layers), len(fetched))]


class CachedSteps:
    """A `StepModel` over a `KVCache`: subclasses implement `forward` (append tokens, return the
    requested outputs for them); prefill and decode are the same on top of it."""

    cache: KVCache
    max_seq_len: int

    @property
    def k_cache(self) -> np.ndarray:
        return self.cache.k

    def check_room(self, steps: int) -> None:
        if self.cache.length + steps > self.max_seq_len:
            raise ValueError(f"{self.cache.length + steps} tokens overflow the cache of {self.max_seq_len}")

    def forward(self, token_ids: list[int], outputs: tuple[str, ...] = ("logits", "next_ids")) -> list:
        raise NotImplementedError

    def prefill(self, prompt_ids: list[int]) -> np.ndarray:
        self.cache.length = 0  # stale slots are masked: the bias only shows slots below the length
        return self.forward(prompt_ids, ("logits",))[0][-1]

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward([token_id], ("logits",))[0][-1]


class GraphStepModel(CachedSteps):
    """Prefill and decode through a "step" graph of any backend (a `StepModel` for the decoding loop)."""

    def __init__(self, graph):
        self.graph, self.cache = graph, graph.cache
        self.max_seq_len = self.cache.max_seq_len

    def causal_bias(self, steps: int) -> np.ndarray:
        """[1, 1, T, S]: token length+t may attend slots 0..length+t."""
        rows = self.cache.length + np.arange(steps)[:, None]
        allowed = np.arange(self.max_seq_len)[None, :] <= rows
        return np.where(allowed, 0.0, np.finfo(self.cache.dtype).min).astype(self.cache.dtype)[None, None]

    def run_tokens(self, token_ids: list[int], positions: np.ndarray, bias: np.ndarray, slots: np.ndarray,
                   outputs: tuple[str, ...]) -> list[np.ndarray]:  # fmt: skip
        """One step with explicit positions [T], bias [1, 1, T, S] and write slots [T] (a tree)."""
        inputs = {"input_ids": np.asarray([token_ids], dtype=np.int64),
                  "positions": np.asarray(positions, dtype=np.int64)[None], "attn_bias": bias,
                  "write_slots": np.asarray(slots, dtype=np.int64)}  # fmt: skip
        return [value[0] for value in self.graph.run(inputs, outputs)]

    def forward(self, token_ids: list[int], outputs: tuple[str, ...] = ("logits", "next_ids")) -> list:
        """Append tokens to the cache; returns the requested outputs for them (batch dim dropped)."""
        steps, start = len(token_ids), self.cache.length
        self.check_room(steps)
        positions = np.arange(start, start + steps, dtype=np.int64)
        values = self.run_tokens(token_ids, positions, self.causal_bias(steps), positions, outputs)
        self.cache.length = start + steps
        return values


class OnnxStepModel(GraphStepModel):
    """A `GraphStepModel` over an ONNX file's "step" graph."""

    def __init__(self, path: Path, signature: dict, config: SessionConfig | None = None,
                 cache: KVCache | None = None):  # fmt: skip
        super().__init__(OnnxGraph(path, cache or KVCache(signature), config or SessionConfig()))


class VerifyStepModel(CachedSteps):
    """The "step" of a speculative artifact, run through its verify graph, which subsumes it: a
    chain tree is a causal step. One graph then holds the weights once (two graphs would load two
    copies). Prefill goes in chunks of at most `max_tree` tokens, the verify graph's largest call (the
    largest tree; a plain artifact's prefill chunk)."""

    def __init__(self, graph: OnnxGraph, max_tree: int, pads_lone_rows: bool = False):
        self.graph, self.cache, self.pads_lone_rows = graph, graph.cache, pads_lone_rows
        # a TVM graph prefills in its largest tuned (static) size; ORT in the largest tree
        self.max_tree = min(max_tree, getattr(graph, "largest_static_tokens", None) or max_tree)
        lone = pads_lone_rows and self.max_tree > 1 and self.max_tree % MLAS_ROW_RANGE == 1
        self.chunk = self.max_tree - 1 if lone else self.max_tree  # a full chunk never needs a pad
        self.max_seq_len = self.cache.max_seq_len

    def forward(self, token_ids: list[int], outputs: tuple[str, ...] = ("logits", "next_ids")) -> list:
        """Append tokens (causally); returns the requested outputs for them: logits [T, V], ids [T],
        features [T, H]."""
        self.check_room(len(token_ids))
        pieces: list[list[np.ndarray]] = []
        for start in range(0, len(token_ids), self.chunk):
            chunk = token_ids[start : start + self.chunk]
            inputs = {"tokens": np.asarray([chunk], dtype=np.int64),
                      "parents": np.maximum(np.arange(len(chunk), dtype=np.int64) - 1, 0),
                      "prefix_len": np.asarray([self.cache.length], dtype=np.int64)}  # fmt: skip
            if self.pads_lone_rows:  # only a last chunk of one row is padded
                pad_lone_rows(inputs, min(self.max_seq_len - self.cache.length, self.max_tree))
            values = self.graph.run(inputs, outputs)
            named = zip(outputs, values, strict=True)
            kept = [(name, first_rows(name, value, len(chunk))) for name, value in named]
            pieces.append([value[0] if name in BATCHED else value for name, value in kept])
            self.cache.length += len(chunk)
        return [np.concatenate([piece[i] for piece in pieces]) for i in range(len(outputs))]
