"""The eager-torch reference: a model definition driven step by step with its KV cache.

This is the oracle every later speed-up is checked against. `ReferenceStepper` implements the
runtime's `StepModel` protocol (prefill a prompt, decode one token -> next-token logits), so the
same decoding loop (`skiptree.runtime.generation`) runs it and every compiled artifact.
The runtime package itself never imports torch; this torch side lives with the models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from skiptree.models.base import CausalLM, mask_value
from skiptree.models.loader import load_model
from skiptree.runtime.generator import TextGenerator, read_eos_token_ids
from skiptree.runtime.tokenizer import Tokenizer


def causal_bias(start: int, steps: int, slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, T, S] bias letting token start+t attend slots 0..start+t (itself included)."""
    rows = start + torch.arange(steps)
    allowed = torch.arange(slots)[None, :] <= rows[:, None]
    bias = torch.zeros(steps, slots, dtype=dtype)
    return bias.masked_fill(~allowed, mask_value(dtype))[None, None]


class ReferenceStepper:
    """Runs a `CausalLM` one step at a time with a KV cache of at most `max_seq_len` slots.

    The cache grows by doubling (attention cost follows the slots allocated, not the context).
    """

    def __init__(self, model: CausalLM, max_seq_len: int | None = None, initial_slots: int = 256):
        self.model = model
        self.max_seq_len = max_seq_len or model.config.max_position_embeddings
        self.dtype = next(model.parameters()).dtype
        self.k_cache, self.v_cache = model.new_kv_cache(1, min(initial_slots, self.max_seq_len))
        self.length = 0

    def _ensure_slots(self, needed: int) -> None:
        if needed > self.max_seq_len:
            raise ValueError(f"sequence of {needed} tokens exceeds the context of {self.max_seq_len}")
        slots = self.k_cache.shape[3]
        if needed <= slots:
            return
        while slots < needed:
            slots *= 2
        k_cache, v_cache = self.model.new_kv_cache(1, min(slots, self.max_seq_len), self.dtype)
        k_cache[:, :, :, : self.length] = self.k_cache[:, :, :, : self.length]
        v_cache[:, :, :, : self.length] = self.v_cache[:, :, :, : self.length]
        self.k_cache, self.v_cache = k_cache, v_cache

    @torch.inference_mode()
    def forward(self, token_ids: list[int]) -> torch.Tensor:
        """Append tokens to the sequence; returns their logits [T, V]."""
        steps = len(token_ids)
        self._ensure_slots(self.length + steps)
        positions = torch.arange(self.length, self.length + steps)
        logits = self.model(
            torch.tensor([token_ids]),
            positions[None],
            causal_bias(self.length, steps, self.k_cache.shape[3], self.dtype),
            self.k_cache,
            self.v_cache,
            positions,
        )
        self.length += steps
        return logits[0]

    def prefill(self, prompt_ids: list[int]) -> np.ndarray:
        self.length = 0  # stale slots are masked by the causal bias, no need to clear them
        return self.forward(prompt_ids)[-1].float().numpy()

    def decode(self, token_id: int) -> np.ndarray:
        return self.forward([token_id])[-1].float().numpy()


class ReferenceModel(TextGenerator):
    """Eager-torch generation from a model folder: the oracle for every compiled artifact."""

    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32):
        self.folder = Path(folder)
        self.model = load_model(self.folder, dtype)
        self.config = self.model.config
        self.tokenizer = Tokenizer.from_folder(self.folder)
        self.eos_token_ids = read_eos_token_ids(self.folder, self.tokenizer)
        self.step_model = ReferenceStepper(self.model)
