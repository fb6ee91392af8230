"""How far a lowered model is from the float model it came from: the compile-time check.

Two measures, both against eager torch on the float weights: (1) a few greedy steps from random
prompt tokens (largest logit error, argmax agreement), which any lowering must pass; (2) for a
quantised artifact, the perplexity of both models on a fixed passage (teacher-forced), so the
cost in quality of a weight format is a number printed at compile time and kept in the manifest.
"""

from __future__ import annotations

import math

import numpy as np

# Written for this check (prose and code, the two kinds of text users decode); no training set
# holds it verbatim.
PASSAGE = (
    "The lighthouse keeper counted the ships that passed each night and wrote their names in a "
    "small green notebook. In winter the fog came early, and the lamp had to be cleaned twice a "
    "day, because salt from the sea air dulled the glass. def moving_average(values, window):\n"
    "    total = sum(values[:window])\n    averages = [total / window]\n"
    "    for i in range(window, len(values)):\n        total += values[i] - values[i - window]\n"
    "        averages.append(total / window)\n    return averages\n"
)


def perplexity(logits: np.ndarray, token_ids: list[int]) -> float:
    """exp(mean NLL) of tokens 1.. given logits [T, V] after each token (teacher-forced)."""
    shifted = logits[:-1].astype(np.float64)
    shifted -= shifted.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return math.exp(-float(np.mean(log_probs[np.arange(len(token_ids) - 1), token_ids[1:]])))
