"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The order and meaning follow transformers' `generate`: logits / temperature, then keep the top-k,
then keep the smallest set whose probability reaches top-p (at least one token), then sample.
numpy only, so compiled artifacts and the torch reference share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from skiptree.errors import GenerationError


@dataclass(frozen=True)
class SamplingConfig:
    """do_sample=False is greedy (argmax; temperature, top_k, top_p are then ignored)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # transformers' default; 0 turns it off
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise GenerationError(
                f"temperature must be > 0 when sampling, got {self.temperature}",
                "pass a positive --temperature, or do_sample=False for greedy decoding",
            )
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}", "pass 0 to disable it")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}", "pass 1.0 to disable it")


def sampling_probabilities(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The distribution sampling draws from, float64 [V], after temperature, top-k and top-p."""
    scores = logits.astype(np.float64) / config.temperature
    if 0 < config.top_k < scores.shape[-1]:
        kth = np.partition(scores, -config.top_k)[-config.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if config.top_p < 1.0:
        order = np.argsort(probs, kind="stable")  # ascending, as transformers' TopPLogitsWarper
        cumulative = np.cumsum(probs[order])
        drop = cumulative <= 1.0 - config.top_p
        drop[-1] = False  # always keep the most likely token
        probs[order[drop]] = 0.0
        probs /= probs.sum()
    return probs


def choose_token(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    """Greedy argmax, or one draw from `sampling_probabilities`."""
    if not config.do_sample:
        return int(np.argmax(logits))
    probs = sampling_probabilities(logits, config)
    return int(rng.choice(probs.shape[-1], p=probs))
