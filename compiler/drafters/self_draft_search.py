"""`--draft self:auto`: choose a self-draft (prefix exit E or skip set S) and its chain length.

Algorithm (documented choice; measured inputs, predicted output):
1. Data: the target's own greedy continuations of the calibration prompts.
2. Acceptance, eager and teacher-forced: one pass per sequence keeps the residual stream after every
   layer, so a prefix exit's top-1 agreement with the target is known for every E at once. Skip sets
   follow the layer-similarity idea of CLaSp / ShortGPT: a layer whose output is most like its input
   (cosine of the hidden states) changes the least when skipped; candidates skip the m most
   similar layers (the first and last never), for every m up to L/2, each scored by one pass.
3. Cost, measured on the backend: the full step T(1) and verify T(n) of the target, and the draft
   step of a probe self-draft running the first L/2 layers; a draft of n layers is then predicted
   as head + n * layer (two measured points, linear in layers: the layers are identical in shape).
4. Speed-up of (draft, chain k) with per-token acceptance a: G = 1 + a + ... + a^k tokens per cycle;
   cycle = k * draft(n) + T(k) for a skip set, (k + 1) * draft(E) + T(k) - E * layer for a prefix
   exit (one more draft pass; verification skips layers < E). Predicted speed-up = G * T(1) / cycle.
The best candidate wins if it beats 1.0; otherwise plain decoding is chosen, and the report says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from skiptree.compiler.specs import SelfDraftSpec
from skiptree.models.base import CausalLM
from skiptree.models.reference import ReferenceStepper, causal_bias
from skiptree.runtime.generation import generate_tokens

MAX_CHAIN = 8


@dataclass
class Calibration:
    """Teacher-forced sequences: (prompt length, prompt + the target's greedy continuation)."""

    sequences: list[tuple[int, list[int]]]


def target_continuations(model: CausalLM, prompts: Sequence[list[int]], new_tokens: int) -> Calibration:
    return Calibration(
        [(len(p), p + generate_tokens(ReferenceStepper(model), p, new_tokens).token_ids) for p in prompts]
    )


@torch.no_grad()
def run_layers(model: CausalLM, sequence: list[int], layers: Sequence[int]) -> list[torch.Tensor]:
    """Residual stream [T, H] before the first layer and after each of `layers`, run in order."""
    steps = len(sequence)
    k_cache, v_cache = model.new_kv_cache(1, steps)
    x, context = model.embed_step(torch.tensor([sequence]), torch.arange(steps)[None])
    bias = causal_bias(0, steps, steps, x.dtype)
    states = [x[0]]
    for layer in layers:
        x = model.run_layer(layer, x, context, bias, k_cache[layer], v_cache[layer], torch.arange(steps))
        states.append(x[0])
    return states


@torch.no_grad()
def exit_agreement_and_similarity(model: CausalLM, data: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """(a[E] = top-1 agreement of a prefix exit after E layers with the target, E = 0..L;
    similarity[i] = mean cosine of layer i's input and output), over the generated positions."""
    count = model.config.num_layers
    agree, similar, positions = np.zeros(count + 1), np.zeros(count), 0
    for first, sequence in data.sequences:
        states = [s[first - 1 : -1] for s in run_layers(model, sequence, range(count))]
        target = model.finish(states[-1]).argmax(-1)
        for exit_layer in range(1, count + 1):
            agree[exit_layer] += float((model.finish(states[exit_layer]).argmax(-1) == target).sum())
        for layer in range(count):
            cosine = torch.nn.functional.cosine_similarity(
                states[layer].float(), states[layer + 1].float(), dim=-1
            )
            similar[layer] += float(cosine.sum())
        positions += len(target)
    return agree / positions, similar / positions


@torch.no_grad()
def skip_agreement(model: CausalLM, data: Calibration, spec: SelfDraftSpec) -> float:
    """Top-1 agreement with the target of the model run without the skipped layers."""
    count = model.config.num_layers
    agree = positions = 0
    for first, sequence in data.sequences:
        target = model.finish(run_layers(model, sequence, range(count))[-1][first - 1 : -1]).argmax(-1)
        draft = model.finish(run_layers(model, sequence, spec.kept(count))[-1][first - 1 : -1]).argmax(-1)
        agree += int((draft == target).sum())
        positions += len(target)
    return agree / positions


def skip_candidates(similarity: np.ndarray) -> list[SelfDraftSpec]:
    """Skip the m layers most similar in and out (never the first or last), m = 1..L/2."""
    count = len(similarity)
    order = [int(i) for i in np.argsort(-similarity) if 0 < i < count - 1]
    return [SelfDraftSpec("skip", skipped=tuple(sorted(order[:m]))) for m in range(1, count // 2 + 1)]


@dataclass(frozen=True)
class SelfDraftCosts:
    """Measured: the full step T(1), verify T(n) by draft nodes, the probe draft's step; derived per layer."""

    decode_ms: float
    verify_ms: dict[int, float]
    probe_layers: int
    probe_ms: float
    num_layers: int

    @property
    def layer_ms(self) -> float:
        return max(0.0, (self.decode_ms - self.probe_ms) / (self.num_layers - self.probe_layers))

    def draft_ms(self, layers: int) -> float:
        return self.probe_ms + (layers - self.probe_layers) * self.layer_ms

    def cycle_ms(self, spec: SelfDraftSpec, chain: int) -> float:
        layers = len(spec.kept(self.num_layers))
        sizes = sorted(self.verify_ms)
        verify = float(np.interp(chain, sizes, [self.verify_ms[n] for n in sizes]))  # between grid points
        if spec.kind == "exit":
            return (chain + 1) * self.draft_ms(layers) + verify - layers * self.layer_ms
        return chain * self.draft_ms(layers) + verify


def predict(spec: SelfDraftSpec, acceptance: float, costs: SelfDraftCosts) -> dict:
    """The best chain length for a draft and its predicted speed-up."""
    best = {"speedup": 0.0}
    for chain in range(1, MAX_CHAIN + 1):
        tokens = sum(acceptance**i for i in range(chain + 1))
        speedup = tokens * costs.decode_ms / costs.cycle_ms(spec, chain)
        if speedup > best["speedup"]:
            best = {"speedup": speedup, "chain": chain, "expected_tokens": tokens}
    layers = len(spec.kept(costs.num_layers))
    return {
        "draft": str(spec),
        "kind": spec.kind,
        "layers_run": layers,
        "acceptance": acceptance,
        "draft_ms": costs.draft_ms(layers),
        "draft_share_of_step": costs.draft_ms(layers) / costs.decode_ms,
        **best,
    }
