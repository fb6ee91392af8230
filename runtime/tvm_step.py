"""Run graphs lowered to TVM (Relax VirtualMachine) with the same surface as the ONNX Runtime graphs.

A graph takes each layer's cache as an argument and returns the updated cache (Relax is
functional; the compiler makes the write an in-place scatter into the argument, so the returned
tensor is the argument itself and nothing is copied). `TvmCache` holds the current tensors and
every call replaces them with the call's outputs, so graphs sharing a `TvmCache` (verify, compact,
a self-draft) always see one cache. The weights are loaded once (`TvmWeights`) and passed to every
call by reference.

A call with N tokens runs the graph's static entry `tokens_N` when it has one (tuned by
MetaSchedule for this N); a verify call pads its tree up to the next static entry (`pad_tree`);
anything else runs the dynamic entry `main` (our matmul schedules, untuned for the rest).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from safetensors.numpy import load_file
from tvm import relax

from skiptree.runtime.manifest import GraphEntry
from skiptree.runtime.onnx_step import SessionConfig, is_cache

STATIC_PREFIX = "tokens_"  # the static entries skiptree.compiler.lower.to_tvm writes
TREE_INPUTS = ("tokens", "parents", "prefix_len")  # a verify graph's (see passes/insert_tree_verify.py)


def pool_for_every_core() -> None:
    """Let TVM's thread pool have a worker per core this process may use. TVM sizes the pool once,
    when first used, from TVM_NUM_THREADS or else half the hardware threads (it assumes SMT), so
    on a 2-core machine `set_threads(2)` ran on one; call this before the pool exists."""
    if hasattr(os, "sched_getaffinity"):
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


pool_for_every_core()  # at import: before anything here can start TVM's pool


def set_threads(threads: int) -> None:
    """The size of TVM's CPU thread pool (0: leave TVM's default, one thread per core)."""
    if threads:
        # sizing the pool pins the calling thread to one core: everything the process runs after it
        # (ORT sessions, numpy, a peer engine) would share that core, so its affinity is restored
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        tvm.get_global_func("runtime.config_threadpool")(1, threads)
        if allowed is not None:
            os.sched_setaffinity(0, allowed)


class TvmWeights:
    """An artifact's weights as TVM tensors, keyed as in the manifest's graph entries."""

    def __init__(self, path: Path):
        self.device = tvm.cpu()
        self.tensors = {key: tvm.runtime.tensor(value, self.device)
                        for key, value in load_file(str(path)).items()}  # fmt: skip

    def arguments(self, keys: list[str]) -> list[Any]:
        return [self.tensors[key] for key in keys]


class TvmCache:
    """The per-layer K/V tensors of one model, `[B, Hkv, S, D]` each, and how many slots are filled."""

    def __init__(self, signature: dict, num_layers: int | None = None):
        specs = [spec for spec in signature["inputs"] if is_cache(spec["name"])]
        self.num_layers = num_layers or len(specs) // 2
        self.layer_shape = [int(d) for d in specs[0]["shape"]]
        self.max_seq_len = self.layer_shape[2]
        self.dtype = np.dtype(specs[0]["dtype"])
        zeros = np.zeros(self.layer_shape, self.dtype)
        self.tensors = {f"{kind}{layer}": tvm.runtime.tensor(zeros, tvm.cpu())
                        for kind in "kv" for layer in range(self.num_layers)}  # fmt: skip
        self.length = 0

    @property
    def k(self) -> np.ndarray:
        """[L, B, Hkv, S, D], a copy (tests compare caches; decoding never reads them on the host)."""
        return np.stack([self.tensors[f"k{layer}"].numpy() for layer in range(self.num_layers)])

    @property
    def v(self) -> np.ndarray:
        return np.stack([self.tensors[f"v{layer}"].numpy() for layer in range(self.num_layers)])


class TvmGraph:
    """One lowered graph over a shared `TvmCache`: `run(inputs, outputs)` as `OnnxGraph.run`."""

    def __init__(self, path: Path, entry: GraphEntry, cache: TvmCache, weights: TvmWeights,
                 config: SessionConfig):  # fmt: skip
        set_threads(config.threads)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        signature = entry.signature
        self.cache = cache
        self.inputs = [spec for spec in signature["inputs"] if spec["name"] not in cache.tensors]
        self.cache_names = [spec["name"] for spec in signature["inputs"] if spec["name"] in cache.tensors]
        self.session_inputs = [spec["name"] for spec in signature["inputs"]]  # as OnnxGraph's
        self.outputs = {spec["name"]: i for i, spec in enumerate(signature["outputs"])}
        self.in_place = signature["in_place"]  # output name -> the cache it replaces
        self.static_tokens = set(entry.static_tokens or ())
        self.weights = weights.arguments(list(entry.params or ()))
        self.token_axis = next(((spec["name"], spec["shape"].index("T")) for spec in self.inputs
                                if "T" in spec["shape"]), None)  # fmt: skip

        self.output_token_axes = {spec["name"]: spec["shape"].index("T") for spec in signature["outputs"]
                                  if "T" in spec["shape"]}  # fmt: skip
        self.pads_trees = [spec["name"] for spec in self.inputs] == list(TREE_INPUTS)

    @property
    def largest_static_tokens(self) -> int | None:
        """The most tokens one tuned call takes (a verify graph's prefill chunk), if any."""
        return max(self.static_tokens) if self.static_tokens and self.pads_trees else None

    def entry_for(self, inputs: dict[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray], int]:
        """(entry, inputs for it, real token count): a static entry when one fits, else `main`."""
        if self.token_axis is None:
            return "main", inputs, 0
        name, axis = self.token_axis
        tokens = inputs[name].shape[axis]
        if tokens in self.static_tokens:
            return f"{STATIC_PREFIX}{tokens}", inputs, tokens
        bucket = min((n for n in self.static_tokens if n > tokens), default=None)
        if not self.pads_trees or bucket is None:
            return "main", inputs, tokens
        if int(inputs["prefix_len"][0]) + bucket > self.cache.max_seq_len:  # no room for the padding
            return "main", inputs, tokens
        return f"{STATIC_PREFIX}{bucket}", pad_tree(inputs, bucket), tokens

    def run(self, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        """Run with the given non-cache inputs; returns the requested outputs, in order."""
        device = tvm.cpu()
        entry, inputs, tokens = self.entry_for(inputs)
        arguments = [tvm.runtime.tensor(np.ascontiguousarray(inputs[spec["name"]], spec["dtype"]), device)
                     for spec in self.inputs]  # fmt: skip
        arguments += [self.cache.tensors[name] for name in self.cache_names]
        result = self.vm[entry](*arguments, *self.weights)
        values = [result] if len(self.outputs) == 1 else list(result)
        for name, cache_name in self.in_place.items():
            self.cache.tensors[cache_name] = values[self.outputs[name]]
        fetched = [values[self.outputs[name]].numpy() for name in outputs]
        axes = self.output_token_axes
        return [value.take(range(tokens), axes[name]) if name in axes else value
                for name, value in zip(outputs, fetched, strict=True)]  # fmt: skip


def pad_tree(inputs: dict[str, np.ndarray], tokens: int) -> dict[str, np.ndarray]:
    """A verify call's tree padded to `tokens` nodes: the extra nodes hang off the root, so no real
    node attends them (only ancestors are visible); they write K/V past the real nodes, into slots
    that are masked until overwritten, as a rejected draft's are. Their outputs are dropped."""
    extra = tokens - inputs["tokens"].shape[1]
    return {**inputs, "tokens": np.pad(inputs["tokens"], ((0, 0), (0, extra))),
            "parents": np.pad(inputs["parents"], (0, extra))}  # fmt: skip


class TvmBackend:
    """Opens an artifact's TVM graphs: one `TvmWeights` for all of them, `TvmCache`s, `TvmGraph`s."""

    def __init__(self, folder: Path, weights: str, graphs: Mapping[str, GraphEntry], config: SessionConfig):
        self.folder, self.graphs, self.config = Path(folder), graphs, config
        self.weights = TvmWeights(self.folder / weights)

    def cache(self, signature: dict, num_layers: int | None = None) -> TvmCache:
        return TvmCache(signature, num_layers)

    def graph(self, name: str, cache: TvmCache) -> TvmGraph:
        entry = self.graphs[name]
        return TvmGraph(self.folder / entry.file, entry, cache, self.weights, self.config)
