"""Speculative decoding: draft a tree, verify it in one target step, accept, compact the cache.

Per step, with L tokens cached and the root (the last emitted token) not yet cached:
  1. the drafter proposes n nodes shaped like the tree (fewer if it has nothing for some);
     n = 0 -> a plain decode step instead;
  2. "verify" runs root + drafts at slots L..L+n (node i at L+i), each attending the prefix and its
     ancestors; greedy fetches only the argmax per node, sampling the logits;
  3. acceptance (`skiptree.runtime.verify`) picks the path a_1..a_k and the bonus token;
  4. "compact" moves the K/V of a_j from slot L+a_j to L+j (skipped when already in place);
     the cache then holds L+1+k tokens and the bonus becomes the next root.
Emitted tokens stop exactly at EOS or max_new_tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from skiptree.runtime.drafters import Drafter
from skiptree.runtime.generation import GenerationResult, check_context
from skiptree.runtime.onnx_step import OnnxGraph, OnnxStepModel, first_rows, pad_lone_rows
from skiptree.runtime.sampling import SamplingConfig, choose_token, sampling_probabilities
from skiptree.runtime.tree import TreeShape
from skiptree.runtime.verify import accept_greedy, accept_sampling, children_of


@dataclass
class StepRecord:
    drafted: int  # draft nodes verified (0: a plain decode step)
    accepted: int  # draft tokens accepted
    emitted: int  # tokens emitted by this step (accepted + bonus, cut at EOS / max_new_tokens)
    draft_seconds: float
    verify_seconds: float
    first_rank: int | None = None  # rank among the root's children of the first accepted draft
    sources: list[str] = field(default_factory=list)  # who proposed each accepted draft token


@dataclass
class SpeculativeResult(GenerationResult):
    steps: list[StepRecord] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per target step (the prefill's first token excluded); plain decoding: 1.0."""
        emitted = sum(step.emitted for step in self.steps)
        return emitted / len(self.steps) if self.steps else 1.0

    @property
    def tokens_by_source(self) -> dict[str, int]:
        """Emitted tokens by who proposed them: each draft source, and "target" for the target's
        own (the prefill's, each step's bonus token, plain steps)."""
        counts: dict[str, int] = {}
        for step in self.steps:
            for source in step.sources[: step.emitted]:  # emitted may be cut at max_new_tokens
                counts[source] = counts.get(source, 0) + 1
        return {"target": len(self.token_ids) - sum(counts.values()), **counts}


class SpeculativeDecoder:
    """Target graphs (step, verify, compact) over one KV cache, a drafter and a tree shape."""

    def __init__(self, step: OnnxStepModel, verify: OnnxGraph, compact: OnnxGraph, drafter: Drafter,
                 shape: TreeShape):  # fmt: skip
        self.step, self.verify_graph, self.compact_graph = step, verify, compact
        self.drafter, self.shape = drafter, shape
        self.max_seq_len = step.max_seq_len

    def with_tree(self, shape: TreeShape, drafter: Drafter | None = None) -> SpeculativeDecoder:
        """The same target graphs (and cache) with another tree shape and/or drafter."""
        return SpeculativeDecoder(self.step, self.verify_graph, self.compact_graph, drafter or self.drafter,
                                  shape)  # fmt: skip

    def _verify(self, context: list[int], tokens: list[int], parents: list[int], greedy: bool,
                hidden: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
        """(next_ids [n + 1] or logits [n + 1, V], and the target's features [n + 1, H] when the
        drafter drafts from them). The tree's root is the context's last token."""
        root = context[-1]
        cache = self.step.cache
        inputs = {"tokens": np.asarray([[root, *tokens]], dtype=np.int64),
                  "parents": np.asarray([0, *(p + 1 for p in parents)], dtype=np.int64),
                  "prefix_len": np.asarray([cache.length], dtype=np.int64)}  # fmt: skip
        if hidden is not None:  # a prefix-exit self-draft: verification starts at its exit layer
            del inputs["tokens"]
            inputs["hidden"] = hidden[None, : len(tokens) + 1]
        rows = len(tokens) + 1
        if getattr(self.step, "pads_lone_rows", False):  # int8 activations: see pad_lone_rows
            pad_lone_rows(inputs, min(self.max_seq_len - cache.length, self.step.max_tree))
        outputs = ("next_ids",) if greedy else ("logits",)
        if greedy and self.wants_logits:
            outputs += ("logits",)
        outputs += ("features",) if self.wants_features else ()
        values = {name: first_rows(name, value, rows)
                  for name, value in zip(outputs, self.verify_graph.run(inputs, outputs), strict=True)}
        if self.wants_logits:  # Token Recycling: the target's candidates after every node
            nodes = [root, *tokens]  # each node's previous token: its parent's (the root's: the context's)
            previous = [*(context[-2:-1] or [-1]), *(nodes[p + 1] for p in parents)]
            self.drafter.observe_logits(nodes, values["logits"][0], previous)
        target = values["next_ids"] if greedy else values["logits"][0]
        return target, (values["features"][0] if self.wants_features else None)

    @property
    def wants_features(self) -> bool:
        return getattr(self.drafter, "wants_features", False)

    @property
    def wants_logits(self) -> bool:
        return getattr(self.drafter, "wants_logits", False)

    def _prefill(self, prompt_ids: list[int]) -> np.ndarray:
        """The prompt's last logits; a feature drafter gets the prompt's features, a recycling
        drafter the candidates after every prompt token (prefill computes them anyway)."""
        if not (self.wants_logits or self.wants_features):
            return self.step.prefill(prompt_ids)
        self.step.cache.length = 0
        return self._observed_forward(prompt_ids, [-1, *prompt_ids[:-1]], reset=True)[-1]

    def _observed_forward(self, tokens: list[int], previous: list[int], reset: bool = False) -> np.ndarray:
        """Logits [n, V] of `tokens` (one call); the drafter observes the logits and features it wants."""
        values = self.step.forward(tokens, ("logits", "features") if self.wants_features else ("logits",))
        if self.wants_logits:
            self.drafter.observe_logits(tokens, values[0], previous)
        if self.wants_features:
            self.drafter.observe(values[1], reset=reset)
        return values[0]

    def _compact(self, accepted: list[int]) -> None:
        start = self.step.cache.length
        moves = [(start + node, start + j) for j, node in enumerate(accepted, start=1) if node != j]
        if moves:
            sources, targets = (np.asarray(side, dtype=np.int64) for side in zip(*moves, strict=True))
            self.compact_graph.run({"from_slots": sources, "to_slots": targets}, ())
        self.step.cache.length = start + 1 + len(accepted)

    def _one_step(self, context: list[int], sampling: SamplingConfig, rng) -> tuple[list[int], StepRecord]:
        start = time.perf_counter()
        room = self.max_seq_len - self.step.cache.length - 1
        draft = self.drafter.propose(context, self.shape, sampling, rng)
        keep = min(len(draft.tokens), max(room, 0))  # parents precede children: a prefix is a tree
        tokens, parents = draft.tokens[:keep], draft.parents[:keep]
        drafted_at = time.perf_counter()
        root = context[-1]
        if not tokens:
            logits = self._observed_forward([root], context[-2:-1] or [-1])
            new = [choose_token(logits[-1], sampling, rng)]
            accepted: list[int] = []
            sources: list[str] = []
            children: list[list[int]] = [[]]
        else:
            full = [root, *tokens]
            children = children_of([0, *(p + 1 for p in parents)])
            target, features = self._verify(context, tokens, parents, not sampling.do_sample, draft.hidden)
            if sampling.do_sample:
                probs = np.stack([sampling_probabilities(row, sampling) for row in target])
                result = accept_sampling(full, children, probs, draft.child_probs[: keep + 1], rng)
            else:
                result = accept_greedy(full, children, target)
            accepted = result.nodes
            labels = draft.sources[:keep] or [self.drafter.name] * keep
            sources = [labels[node - 1] for node in accepted]
            if hasattr(self.drafter, "observe_accepted"):
                self.drafter.observe_accepted(keep, accepted)
            if features is not None:
                self.drafter.observe(features[[0, *accepted]])
            self._compact(accepted)
            new = [full[node] for node in accepted] + [result.bonus]
        first_rank = children[0].index(accepted[0]) if accepted else None
        record = StepRecord(len(tokens), len(accepted), len(new), drafted_at - start,
                            time.perf_counter() - drafted_at, first_rank, sources)  # fmt: skip
        return new, record

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None,
                 eos_token_ids: Sequence[int] = (), seed: int | None = None,
                 on_token: Callable[[int], None] | None = None) -> SpeculativeResult:  # fmt: skip
        sampling = sampling or SamplingConfig()
        prompt_ids = [int(t) for t in prompt_ids]
        check_context(len(prompt_ids), max_new_tokens, self.max_seq_len)
        rng, eos = np.random.default_rng(seed), set(eos_token_ids)
        result = SpeculativeResult(prompt_ids=prompt_ids)
        start = time.perf_counter()
        new = [choose_token(self._prefill(prompt_ids), sampling, rng)]
        result.prefill_seconds = time.perf_counter() - start
        start, context = time.perf_counter(), list(prompt_ids)
        while True:
            for index, token in enumerate(new):
                result.token_ids.append(token)
                context.append(token)
                if on_token is not None:
                    on_token(token)
                if token in eos:
                    if result.steps:  # the tokens after EOS were never emitted
                        result.steps[-1].emitted = index + 1
                    result.stop_reason = "eos"
                    result.decode_seconds = time.perf_counter() - start
                    return result
                if len(result.token_ids) == max_new_tokens:
                    result.decode_seconds = time.perf_counter() - start
                    return result
            new, record = self._one_step(context, sampling, rng)
            record.emitted = min(record.emitted, max_new_tokens - len(result.token_ids))
            result.steps.append(record)
