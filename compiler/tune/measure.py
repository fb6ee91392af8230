"""The hardware-aware tuner: measure, then shape the draft tree with Sequoia's DP, or choose plain.

Measured on the real backend and device (each value persisted in the session as it is taken):
  decode_ms      a plain one-token step at a `prefix`-token context
  verify_ms[n]   the verify graph on a tree of n draft nodes (n + 1 tokens) at the same context
  acceptance     p_r: how often the drafter's r-th child of the root is the accepted one, from
                 width-W depth-1 trees while decoding calibration prompts greedily; with the hit
                 rate h (steps where the drafter proposed anything) and the draft time per node
Predicted speed-up of a tree of n nodes and depth d, G = solve_tree(p, n, d).expected_tokens:
  tokens/step  h G + (1 - h)
  ms/step      h (verify_ms[n] + draft) + (1 - h) decode_ms
  speed-up     (tokens/step / ms/step) * decode_ms
The best (n, d) wins if its predicted speed-up exceeds 1, else plain decoding is chosen.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from skiptree.compiler.tune.tree_dp import solve_tree
from skiptree.runtime.artifact import Runtime
from skiptree.runtime.drafters import DraftModelDrafter
from skiptree.runtime.feature_draft import FeatureDrafter
from skiptree.runtime.generation import generate_tokens
from skiptree.runtime.sampling import SamplingConfig
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


def _median_ms(run, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):  # ORT plans memory on the first runs of a new shape
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _context(runtime: Runtime, prefix: int) -> list[int]:
    """A `prefix`-token context of ordinary ids (the values do not change the cost)."""
    vocab = runtime.manifest["model"]["config"]["vocab_size"]
    return [(7 * i) % vocab for i in range(prefix)]


def _prompt_ids(runtime: Runtime, prompt: str) -> list[int]:
    """Calibration prompts go through the chat template when the model has one."""
    return runtime.encode_prompt(prompt, chat=runtime.tokenizer.chat_template is not None)


def measure_decode_ms(runtime: Runtime, prefix: int, repeats: int = 7) -> float:
    step = runtime.step_model
    step.prefill(_context(runtime, prefix))

    def one_step() -> None:
        step.cache.length = prefix
        step.forward([5], ("next_ids",))

    return _median_ms(one_step, repeats)


def measure_verify_ms(runtime: Runtime, nodes: int, prefix: int, repeats: int = 7) -> float:
    spec = runtime.speculative
    runtime.step_model.prefill(_context(runtime, prefix))
    tokens, parents = [5] * nodes, list(chain(nodes).parents)
    hidden = None
    if "hidden" in spec.verify_graph.session_inputs:  # a prefix exit verifies from hidden states
        size = runtime.manifest["model"]["config"]["hidden_size"]
        hidden = np.zeros((nodes + 1, size), dtype=runtime.step_model.cache.dtype)
    return _median_ms(lambda: spec._verify([5], tokens, parents, True, hidden), repeats)


def measure_draft_level_ms(runtime: Runtime, width: int, prefix: int, repeats: int = 7) -> float:
    """A draft model's or feature head's cost for one tree level of `width` nodes (0 for lookups)."""
    drafter = runtime.speculative.drafter
    if isinstance(drafter, FeatureDrafter):  # one head call on `width` nodes after a prefix
        rows = list(range(width))
        bias = tree_bias([-1] * width, prefix, prefix, rows, drafter.max_seq_len, drafter.features.dtype)
        features = np.zeros((width, drafter.features.shape[1]), dtype=drafter.features.dtype)
        positions, slots = np.full(width, prefix + 1), np.arange(prefix, prefix + width)
        return _median_ms(lambda: drafter.run_pairs(features, [5] * width, positions, bias, slots), repeats)
    if not isinstance(drafter, DraftModelDrafter):
        return 0.0
    model = drafter.model
    model.prefill(_context(runtime, prefix))
    parents = [-1] * width
    bias = tree_bias(parents, prefix, prefix, list(range(width)), model.max_seq_len, model.cache.dtype)
    slots = np.arange(prefix, prefix + width)
    return _median_ms(lambda: model.run_tokens([5] * width, slots, bias, slots, ("logits",)), repeats)


def measure_acceptance(runtime: Runtime, prompts, width: int, max_new_tokens: int,
                       temperature: float = 0.0) -> dict[str, Any]:  # fmt: skip
    """Acceptance by rank from width-`width` depth-1 trees: greedy, or sampling at `temperature`."""
    sampling = SamplingConfig(do_sample=temperature > 0, temperature=temperature or 1.0, top_k=0)
    decoder = runtime.speculative.with_tree(k_ary(width, 1))
    ranks, steps, hits, draft_seconds, drafted = [0] * width, 0, 0, 0.0, 0
    for prompt in tqdm(prompts, desc="    calibration prompts", file=sys.stderr, leave=False):
        ids = _prompt_ids(runtime, prompt)
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
        ids = _prompt_ids(runtime, prompt)
        for step in decoder.generate(ids, max_new_tokens, eos_token_ids=runtime.eos_token_ids).steps:
            for k in range(min(step.drafted, step.accepted + 1)):  # the k-th is judged if all before passed
                attempted[k] += 1
                accepted[k] += step.accepted > k
    return [a / t if t else 0.0 for a, t in zip(accepted, attempted, strict=True)]


def acceptance_by_depth(acceptance: list[float], chain_acceptance: list[float]) -> list[list[float]]:
    """Per-depth rank vectors: depth 1 as measured on width-W trees; deeper levels take the chain's
    conditional rank-1 acceptance, and the lower ranks of depth 1 scaled to keep the sum <= 1."""
    levels = [list(acceptance)]
    rest = sum(acceptance[1:])
    for first in chain_acceptance[1:]:
        scale = min(1.0, (1.0 - first) / rest) if rest > 0 else 0.0
        levels.append([first, *(p * scale for p in acceptance[1:])])
    return levels


def draft_ms(parents: tuple[int, ...], per_node_ms: float, level_ms: dict[int, float]) -> float:
    """Draft time of a tree: per-node cost (lookups) plus, for a draft model, one call per level
    with the level's width, priced by the nearest measured width at or above it."""
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent < 0 else depth[parent] + 1)
    total = per_node_ms * len(parents)
    if level_ms:
        widths = [1] + [depth.count(d) for d in range(1, max(depth, default=0))]  # levels fed to the draft
        for width in widths:
            fit = min((w for w in level_ms if w >= width), default=max(level_ms))
            total += level_ms[fit] * max(1.0, width / fit)
    return total


def monotone(verify_ms: dict[int, float]) -> dict[int, float]:
    """Verify cost cannot fall as the tree grows; a measurement that does (a noisy neighbour on a
    shared machine) is raised to the largest cost of a smaller tree, so noise cannot buy a big tree."""
    out, highest = {}, 0.0
    for nodes, cost in sorted(verify_ms.items()):
        highest = max(highest, cost)
        out[nodes] = highest
    return out


def padded_level_ms(level_ms: dict[int, float]) -> dict[int, float]:
    """A draft level of width w costs at most a wider measured level (pad it): noise that makes a
    narrow level look dearer than a wide one (measured: width 1 at 279 ms, width 2 at 180 ms on
    a loaded machine) would otherwise push the choice to wide trees."""
    return {w: min(ms for wider, ms in level_ms.items() if wider >= w) for w in level_ms}


def choose_tree(acceptance: dict[str, Any], verify_ms: dict[int, float], decode_ms: float,
                max_depth: int = 8, level_ms: dict[int, float] | None = None,
                by_depth: list[list[float]] | None = None) -> dict[str, Any]:  # fmt: skip
    """The (n, d) with the best predicted speed-up, or plain decoding when none beats 1.0."""
    p, hit = acceptance["acceptance"], acceptance["hit_rate"]
    level_ms = padded_level_ms({w: ms for w, ms in (level_ms or {}).items() if ms > 0})
    best: dict[str, Any] = {"mode": "plain", "predicted_speedup": 1.0, "parents": []}
    candidates = []
    for nodes, cost in monotone(verify_ms).items():
        for depth in range(1, min(max_depth, nodes) + 1):
            tree = solve_tree(p, nodes, depth, by_depth)
            per_node = 0.0 if level_ms else acceptance["draft_ms_per_node"]  # a model: levels priced
            draft = draft_ms(tree.parents, per_node, level_ms)
            tokens = hit * tree.expected_tokens + (1 - hit)
            ms = hit * (cost + draft) + (1 - hit) * decode_ms
            speedup = tokens / ms * decode_ms
            candidates.append({"nodes": nodes, "depth": depth, "expected_tokens": tree.expected_tokens,
                               "predicted_speedup": speedup})  # fmt: skip
            if speedup > best["predicted_speedup"]:
                best = {"mode": "speculative", "predicted_speedup": speedup,
                        "parents": list(tree.parents), "expected_tokens": tree.expected_tokens,
                        "nodes": nodes, "depth": tree.depth}  # fmt: skip
    return {**best, "candidates": candidates}


def measure_speedup(runtime: Runtime, parents: list[int], prompts, max_new_tokens: int) -> float:
    """Measured decode speed-up of the tree over plain decoding on the prompts (median ratio)."""
    decoder = runtime.speculative.with_tree(TreeShape(tuple(parents)))
    ratios = []
    for prompt in tqdm(prompts, desc="    measuring the chosen tree", file=sys.stderr, leave=False):
        ids = _prompt_ids(runtime, prompt)
        plain = runtime.step_model
        start = time.perf_counter()
        base = generate_tokens(plain, ids, max_new_tokens, eos_token_ids=runtime.eos_token_ids)
        base_time = time.perf_counter() - start
        start = time.perf_counter()
        fast = decoder.generate(ids, max_new_tokens, eos_token_ids=runtime.eos_token_ids)
        fast_time = time.perf_counter() - start
        ratios.append((len(fast.token_ids) / fast_time) / (len(base.token_ids) / base_time))
    return float(np.median(ratios))
