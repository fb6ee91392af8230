"""Early-exit decoding at run time (lossy; see passes/insert_early_exit.py).

Prefill runs the full "step" graph; every decode step runs "exit_step", which decides inside the
graph after which layer to stop and reports `layers_run`. The two graphs share one KV cache (each
session holds its own copy of the weights: memory is about twice a plain artifact's).
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.onnx_step import GraphStepModel

NEVER = 2.0  # a threshold no gate reaches: the full model


class EarlyExitStepModel(GraphStepModel):
    """A `StepModel` whose decode steps may exit early; `layers_run` lists each decode step's depth.
    `exit_graph` shares the step graph's cache."""

    def __init__(self, step_graph, exit_graph, threshold: float):
        super().__init__(step_graph)
        self.exit_graph = exit_graph
        self.threshold = threshold
        self.layers_run: list[int] = []

    def prefill(self, prompt_ids: list[int]) -> np.ndarray:
        self.layers_run = []
        return super().prefill(prompt_ids)

    def decode(self, token_id: int) -> np.ndarray:
        self.check_room(1)
        start = self.cache.length
        inputs = {"input_ids": np.asarray([[token_id]], dtype=np.int64),
                  "positions": np.asarray([[start]], dtype=np.int64), "attn_bias": self.causal_bias(1),
                  "write_slots": np.asarray([start], dtype=np.int64),
                  "threshold": np.asarray([self.threshold], dtype=np.float32)}  # fmt: skip
        logits, layers_run = self.exit_graph.run(inputs, ("logits", "layers_run"))
        self.cache.length = start + 1
        self.layers_run.append(int(layers_run[0]))
        return logits[0, -1]

    def full_model_agreement(self, prompt_ids: list[int], token_ids: list[int]) -> float | None:
        """Share of decoded tokens (all but the first, which prefill takes from the full model) that the
        full model would have chosen after the same prefix: one full pass over prompt + output."""
        if len(token_ids) < 2:
            return None
        sequence = [*prompt_ids, *token_ids[:-1]]
        self.cache.length = 0  # the generation is over: its cache may be overwritten
        chosen = self.forward(sequence, ("next_ids",))[0][len(prompt_ids) :]
        return float(np.mean(np.asarray(token_ids[1:]) == chosen))
