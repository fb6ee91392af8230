"""The autoregressive decoding loop shared by the torch reference and every compiled artifact.

A `StepModel` turns token ids into next-token logits while keeping its own KV cache; this loop
picks tokens, streams them, and stops exactly at EOS or `max_new_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from skiptree.errors import GenerationError
from skiptree.runtime.sampling import SamplingConfig, choose_token


class StepModel(Protocol):
    """What decoding needs from a model: a context size, prefill, and one-token decode."""

    max_seq_len: int

    def prefill(self, prompt_ids: list[int]) -> np.ndarray:
        """Reset the cache, run the prompt, return the logits [V] after its last token."""
        ...

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token, return the logits [V] that follow it."""
        ...


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # new tokens, the EOS token included
    stop_reason: str = "length"  # "eos" or "length"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # time of the decode steps (every token after the first)
    layers_run: list[int] | None = None  # early exit: layers each decode step ran (lossy mode)

    @property
    def mean_layers(self) -> float | None:
        return float(sum(self.layers_run) / len(self.layers_run)) if self.layers_run else None

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput: tokens produced by decode steps per second (prefill excluded)."""
        steps = len(self.token_ids) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def check_context(prompt_len: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Refuse requests that cannot fit the model's context, before any compute."""
    if prompt_len == 0:
        raise GenerationError("the prompt is empty", "give at least one token of prompt")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}", "pass 1 or more")
    if prompt_len + max_new_tokens > max_seq_len:
        raise GenerationError(
            f"the prompt has {prompt_len} tokens and max_new_tokens is {max_new_tokens}, "
            f"but the context holds {max_seq_len}",
            f"shorten the prompt or lower max_new_tokens to at most {max(max_seq_len - prompt_len, 0)}",
        )


def generate_tokens(
    model: StepModel,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_token_ids: Sequence[int] = (),
    seed: int | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Plain autoregressive decoding: one model step per new token."""
    prompt_ids = [int(t) for t in prompt_ids]
    check_context(len(prompt_ids), max_new_tokens, model.max_seq_len)
    sampling = sampling or SamplingConfig()
    rng = np.random.default_rng(seed)
    eos = set(eos_token_ids)
    result = GenerationResult(prompt_ids=prompt_ids)

    start = time.perf_counter()
    logits = model.prefill(prompt_ids)
    result.prefill_seconds = time.perf_counter() - start

    start = time.perf_counter()
    while True:
        token = choose_token(logits, sampling, rng)
        result.token_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos:
            result.stop_reason = "eos"
            break
        if len(result.token_ids) == max_new_tokens:
            break
        logits = model.decode(token)
    result.decode_seconds = time.perf_counter() - start
    return result
