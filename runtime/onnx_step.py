"""Run a lowered step graph with ONNX Runtime: the `StepModel` of an onnxruntime artifact.

The KV cache lives in two numpy buffers `[L, B, Hkv, S, D]` owned here. Each layer's slice is
bound by pointer as graph input `k{i}` / `v{i}` *and* as output `k{i}_out` / `v{i}_out`: ORT's
ScatterND then updates the cache in place, so no step copies the cache, through numpy or
otherwise (`test_cache_is_updated_in_place` watches for that ORT behaviour changing).
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
    """How to run the graph: threads (0 = ORT's default), optimisation level, providers."""

    threads: int = 0
    optimization_level: str = "extended"  # measured: "all" gains nothing on CPU here
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def make_session(path: Path, config: SessionConfig) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[config.optimization_level]
    if config.threads:
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(config.providers))


class OnnxStepModel:
    """Prefill and decode through one ORT session with an in-place KV cache of `max_seq_len` slots.

    `signature` is the manifest's description of the step graph (inputs with shapes and dtypes).
    """

    def __init__(self, path: Path, signature: dict, config: SessionConfig | None = None):
        self.session = make_session(path, config or SessionConfig())
        caches = [spec for spec in signature["inputs"] if spec["name"][:1] in ("k", "v")
                  and spec["name"][1:].isdigit()]  # fmt: skip
        self.num_layers = len(caches) // 2
        self.cache_shape = [int(d) for d in caches[0]["shape"]]  # [B, Hkv, S, D]
        self.max_seq_len = self.cache_shape[2]
        self.dtype = np.dtype(caches[0]["dtype"])
        self.k_cache = np.zeros((self.num_layers, *self.cache_shape), self.dtype)
        self.v_cache = np.zeros_like(self.k_cache)
        self.binding = self.session.io_binding()
        for layer in range(self.num_layers):
            for prefix, buffer in (("k", self.k_cache), ("v", self.v_cache)):
                self.binding.bind_input(f"{prefix}{layer}", "cpu", 0, self.dtype, self.cache_shape,
                                        buffer[layer].ctypes.data)  # fmt: skip
        self.length = 0

    def _bind_outputs(self) -> None:
        # Re-bound every step: ORT keeps the previous run's output shapes otherwise.
        self.binding.clear_binding_outputs()
        for layer in range(self.num_layers):
            for prefix, buffer in (("k", self.k_cache), ("v", self.v_cache)):
                self.binding.bind_output(f"{prefix}{layer}_out", "cpu", 0, self.dtype, self.cache_shape,
                                         buffer[layer].ctypes.data)  # fmt: skip
        self.binding.bind_output("logits", "cpu")
        self.binding.bind_output("next_ids", "cpu")

    def causal_bias(self, steps: int) -> np.ndarray:
        """[1, 1, T, S]: token length+t may attend slots 0..length+t."""
        rows = self.length + np.arange(steps)[:, None]
        allowed = np.arange(self.max_seq_len)[None, :] <= rows
        bias = np.where(allowed, 0.0, np.finfo(self.dtype).min).astype(self.dtype)
        return bias[None, None]

    def forward(self, token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Append tokens; returns (logits [T, V], argmax ids [T])."""
        steps = len(token_ids)
        if self.length + steps > self.max_seq_len:
            raise ValueError(f"{self.length + steps} tokens overflow the cache of {self.max_seq_len}")
        positions = np.arange(self.length, self.length + steps, dtype=np.int64)
        for name, value in (
            ("input_ids", np.asarray([token_ids], dtype=np.int64)),
            ("positions", positions[None]),
            ("attn_bias", self.causal_bias(steps)),
            ("write_slots", positions),
        ):
            self.binding.bind_cpu_input(name, value)
        self._bind_outputs()
        self.session.run_with_iobinding(self.binding)
        outputs = self.binding.get_outputs()  # in binding order: caches, logits, next_ids
        self.length += steps
        return outputs[-2].numpy()[0], outputs[-1].numpy()[0]

    def prefill(self, prompt_ids: list[int]) -> np.ndarray:
        self.length = 0  # stale slots are masked by the causal bias
        return self.forward(prompt_ids)[0][-1]

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward([token_id])[0][-1]
