"""Measuring on the real backend and device: what the tuner's choice is made from.

Each value is persisted in the session as it is taken (compiler/tune/session.py):
  decode_ms      a plain one-token step at a `prefix`-token context
  verify_ms[n]   the verify graph on a tree of n draft nodes (n + 1 tokens) at the same context
  draft_level_ms a draft model's (or feature head's) call on one tree level of width w
  acceptance     p_r: how often the drafter's r-th child of the root is the accepted one, from
                 width-W depth-1 trees while decoding calibration prompts greedily; with the hit
                 rate h (steps where the drafter proposed anything) and the draft time per node
  chain accept.  the k-th draft of a chain given the ones before (how acceptance falls with depth)
  speed-up       the chosen tree's real decode speed-up over plain decoding (median ratio)
compiler/tune/choose.py turns them into a tree.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm import tqdm

from skiptree.runtime.artifact import Runtime
from skiptree.runtime.drafters import DraftModelDrafter
from skiptree.runtime.feature_draft import FeatureDrafter
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.head_source import HeadCandidates
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.self_draft import run_draft_graph
from skiptree.runtime.tree import TreeShape, chain, k_ary, tree_bias

CALIBRATION_PROMPTS = (
    "Explain what a hash table is and when to use one.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Add type hints to this function:\ndef area(width, height):\n    return width * height\n",
    "Summarise in one sentence: The committee met on Tuesday and agreed to move the annual "
    "meeting to March, because the venue in February was unavailable.",
    "Fix the bug in this code:\nfor i in range(10)\n    print(i)\n",
    "List three differences between lists and tuples in Python.",
)
VERIFY_SIZES = (1, 2, 4, 8, 16, 32)
DRAFT_WIDTHS = (1, 2, 4, 8)


def median_ms(run: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `run` in ms, after `warmup` untimed runs."""
    for _ in range(warmup):  # ORT plans memory on the first runs of a new shape
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def context_ids(runtime: Runtime, prefix: int) -> list[int]:
    """A `prefix`-token context of ordinary ids (the values do not change the cost)."""
    vocab = runtime.manifest.model.config["vocab_size"]
    return [(7 * i) % vocab for i in range(prefix)]


def prompt_ids(runtime: Runtime, prompt: str) -> list[int]:
    """Calibration prompts go through the chat template when the model has one."""
    return runtime.encode_prompt(prompt, chat=runtime.tokenizer.chat_template is not None)


def measure_decode_ms(runtime: Runtime, prefix: int, repeats: int = 7) -> float:
    step = runtime.step_model
    step.prefill(context_ids(runtime, prefix))

    def one_step() -> None:
        step.cache.length = prefix
        step.forward([5], ("next_ids",))

    return median_ms(one_step, repeats)


def measure_verify_ms(runtime: Runtime, nodes: int, prefix: int, repeats: int = 7) -> float:
    spec = runtime.speculative
    runtime.step_model.prefill(context_ids(runtime, prefix))
    tokens, parents = [5] * nodes, list(chain(nodes).parents)
    hidden = None
    if "hidden" in spec.verify_graph.session_inputs:  # a prefix exit verifies from hidden states
        size = runtime.manifest.model.config["hidden_size"]
        hidden = np.zeros((nodes + 1, size), dtype=runtime.step_model.cache.dtype)
    return median_ms(lambda: spec._verify([5], tokens, parents, True, hidden), repeats)


def measure_draft_level_ms(runtime: Runtime, width: int, prefix: int, repeats: int = 7) -> float:
    """A draft model's or feature head's cost for one tree level of `width` nodes (0 for lookups)."""
    drafter = runtime.speculative.drafter
    # a feature head merged with free drafters costs what the head costs (the lookups ~0)
    heads = [s.drafter for s in getattr(drafter, "sources", ()) if isinstance(s, HeadCandidates)]
    drafter = heads[0] if heads else drafter
    if isinstance(drafter, FeatureDrafter):  # one head call on `width` nodes after a prefix
        rows = list(range(width))
        bias = tree_bias([-1] * width, prefix, prefix, rows, drafter.max_seq_len, drafter.features.dtype)
        features = np.zeros((width, drafter.features.shape[1]), dtype=drafter.features.dtype)
        positions, slots = np.full(width, prefix + 1), np.arange(prefix, prefix + width)
        return median_ms(lambda: drafter.run_pairs(features, [5] * width, positions, bias, slots), repeats)
    if not isinstance(drafter, DraftModelDrafter):
        return 0.0
    model = drafter.model
    model.prefill(context_ids(runtime, prefix))
    parents = [-1] * width
    bias = tree_bias(parents, prefix, prefix, list(range(width)), model.max_seq_len, model.cache.dtype)
    slots = np.arange(prefix, prefix + width)
    return median_ms(lambda: model.run_tokens([5] * width, slots, bias, slots, ("logits",)), repeats)


def measure_acceptance(runtime: Runtime, prompts, width: int, max_new_tokens: int,
                       temperature: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Acceptance by rank from width-`width` depth-1 trees: greedy, or sampling at `temperature`."""
    sampling = SamplingConfig(do_sample=temperature > 0, temperature=temperature or 1.0, top_k=0)
    decoder = runtime.speculative.with_tree(k_ary(width, 1))
    ranks, steps, hits, draft_seconds, drafted = [0] * width, 0, 0, 0.0, 0
    for prompt in tqdm(prompts, desc="    calibration prompts", file=sys.stderr, leave=False):
        ids = prompt_ids(runtime, prompt)
        result = decoder.generate(ids, max_new_tokens, sampling, eos_token_ids=runtime.eos_token_ids, seed=0)
        for step in result.steps:
            steps += 1
            draft_seconds += step.draft_seconds
            drafted += step.drafted
            hits += step.drafted > 0
            if step.first_rank is not None:
                ranks[step.first_rank] += 1
    return {"acceptance": [r / max(hits, 1) for r in ranks], "hit_rate": hits / max(steps, 1),
            "draft_ms_per_node": 1000 * draft_seconds / max(drafted, 1), "steps": steps}  # fmt: skip


def measure_depth_acceptance(runtime: Runtime, prompts, depth: int, max_new_tokens: int) -> list[float]:
    """P(the k-th draft of a chain is accepted | the k - 1 before it were), k = 1..depth."""
    decoder = runtime.speculative.with_tree(chain(depth))
    attempted, accepted = [0] * depth, [0] * depth
    for prompt in tqdm(prompts, desc="    chain acceptance by depth", file=sys.stderr, leave=False):
        ids = prompt_ids(runtime, prompt)
        for step in decoder.generate(ids, max_new_tokens, eos_token_ids=runtime.eos_token_ids).steps:
            for k in range(min(step.drafted, step.accepted + 1)):  # the k-th is judged if all before passed
                attempted[k] += 1
                accepted[k] += step.accepted > k
    return [a / t if t else 0.0 for a, t in zip(accepted, attempted, strict=True)]


def measure_speedup(runtime: Runtime, parents: list[int], prompts, max_new_tokens: int) -> float:
    """Measured decode speed-up of the tree over plain decoding on the prompts (median ratio)."""
    decoder = runtime.speculative.with_tree(TreeShape(tuple(parents)))
    ratios = []
    for prompt in tqdm(prompts, desc="    measuring the chosen tree", file=sys.stderr, leave=False):
        ids = prompt_ids(runtime, prompt)
        plain = runtime.step_model
        start = time.perf_counter()
        base = generate_tokens(plain, ids, max_new_tokens, eos_token_ids=runtime.eos_token_ids)
        base_time = time.perf_counter() - start
        start = time.perf_counter()
        fast = decoder.generate(ids, max_new_tokens, eos_token_ids=runtime.eos_token_ids)
        fast_time = time.perf_counter() - start
        ratios.append((len(fast.token_ids) / fast_time) / (len(base.token_ids) / base_time))
    return float(np.median(ratios))


def measure_probe_ms(runtime: Runtime, prefix: int) -> float:
    """One self-draft pass (one token) of the runtime's drafter after a `prefix`-token context."""
    graph = runtime.speculative.drafter.graph
    runtime.step_model.prefill(context_ids(runtime, prefix))
    return median_ms(lambda: run_draft_graph(graph, [5], prefix, ("next_ids",)), 7)
