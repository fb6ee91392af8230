"""Which tokens a shrunk draft head keeps: the target's most frequent outputs on calibration prompts.

Counts the tokens of the target's own greedy continuations (its output distribution, which is what
a draft must predict) plus the prompts; ties and the remainder up to V follow token id order
(byte-pair merges are numbered roughly by frequency). Coverage = the share of those continuation
tokens inside the kept set (in-sample, so an upper bound on held-out text).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from skiptree.models.base import CausalLM
from skiptree.models.reference import ReferenceStepper
from skiptree.runtime.generation import generate_tokens


def frequent_tokens(model: CausalLM, prompts: Sequence[list[int]], size: int, new_tokens: int = 48
                    ) -> tuple[tuple[int, ...], float]:  # fmt: skip
    """(the `size` kept token ids, most frequent first; coverage of the target's output tokens)."""
    vocab = model.config.vocab_size
    size = min(size, vocab)
    outputs: list[int] = []
    for prompt in prompts:
        outputs += generate_tokens(ReferenceStepper(model), prompt, new_tokens).token_ids
    counts = Counter(outputs) + Counter(t for p in prompts for t in p)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    chosen = set(ranked)
    ranked += [t for t in range(vocab) if t not in chosen][: size - len(ranked)]
    kept = set(ranked)
    coverage = sum(t in kept for t in outputs) / max(len(outputs), 1)
    return tuple(ranked), coverage
