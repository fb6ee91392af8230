"""Calibrating early exit (CALM): the one threshold that reaches a user-set agreement with the full model.

Data: the full model's own greedy continuations of calibration prompts (its distribution, which is
what decoding will see). One eager forward over each prompt + continuation gives, at every generated
position and every exit, the exit head's token and the gate's confidence (`gate_confidence`, the
same function the lowered graph runs) next to the full model's token.
Policy for a threshold t: emit at the first exit whose confidence >= t, else run the full model.
Agreement(t) = share of positions where that token is the full model's; we choose the t with the
fewest mean layers among those with agreement >= the target (CALM's consistency target; we
calibrate empirically on the observed positions rather than with CALM's Learn-then-Test bound).
Calibration is teacher-forced on the full model's K/V; at run time the skipped layers' K/V are
propagated from exit states, which can lower agreement a little: `generate --stats` measures it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from skiptree.compiler.specs import EarlyExitSpec
from skiptree.models.base import CausalLM
from skiptree.models.reference import ReferenceStepper, causal_bias
from skiptree.passes.insert_early_exit import NEVER, ExitStepModule, gate_confidence
from skiptree.runtime.generation import generate_tokens


@dataclass
class ExitObservations:
    confidence: np.ndarray  # [N, exits]
    exit_tokens: np.ndarray  # [N, exits]
    full_tokens: np.ndarray  # [N]


@torch.no_grad()
def observe_exits(model: CausalLM, sequence: list[int], first: int, spec: EarlyExitSpec,
                  vocab: Sequence[int] = ()) -> ExitObservations:  # fmt: skip
    """Exit tokens and confidences at positions first-1.. of `sequence` (predicting tokens first..)."""
    steps = len(sequence)
    dtype = next(model.parameters()).dtype
    k_cache, v_cache = model.new_kv_cache(1, steps)
    positions = torch.arange(steps)[None]
    x, context = model.embed_step(torch.tensor([sequence]), positions)
    bias, slots = causal_bias(0, steps, steps, dtype), torch.arange(steps)
    confidence, tokens = [], []
    previous = x
    heads = ExitStepModule(model, spec.exits, spec.gate, torch.tensor(vocab) if vocab else None)  # as lowered
    for layer in range(model.config.num_layers):
        if layer in spec.exits:
            logits = heads.exit_logits(x)[0, first - 1 : -1]
            confidence.append(
                gate_confidence(spec.gate, logits, x[0, first - 1 : -1], previous[0, first - 1 : -1])
            )
            tokens.append(logits.argmax(-1))
        previous = x
        x = model.run_layer(layer, x, context, bias, k_cache[layer], v_cache[layer], slots)
    full = model.finish(x)[0, first - 1 : -1].argmax(-1)
    return ExitObservations(torch.stack(confidence, 1).float().numpy(), torch.stack(tokens, 1).numpy(),
                            full.numpy())  # fmt: skip


def exit_policy(obs: ExitObservations, threshold: float, exits: Sequence[int], num_layers: int
                ) -> tuple[float, float, np.ndarray]:  # fmt: skip
    """(agreement with the full model, mean layers run, layers run per position) at a threshold."""
    fires = obs.confidence >= threshold  # [N, exits]
    first = np.where(fires.any(1), fires.argmax(1), len(exits))
    exit_layers = np.asarray([*exits, num_layers])
    padded = np.concatenate([obs.exit_tokens, obs.full_tokens[:, None]], 1)
    emitted = padded[np.arange(len(first)), first]
    layers = exit_layers[first]
    return float((emitted == obs.full_tokens).mean()), float(layers.mean()), layers


def choose_threshold(obs: ExitObservations, spec: EarlyExitSpec, num_layers: int) -> dict:
    """The threshold with the fewest mean layers whose agreement reaches spec.min_agreement."""
    candidates = np.unique(np.concatenate([obs.confidence.ravel(), [NEVER]]))
    best = {"threshold": NEVER, "agreement": 1.0, "mean_layers": float(num_layers)}
    for threshold in candidates[::-1]:  # from never firing down to always firing
        agreement, mean_layers, _ = exit_policy(obs, float(threshold), spec.exits, num_layers)
        if agreement >= spec.min_agreement and mean_layers < best["mean_layers"]:
            best = {"threshold": float(threshold), "agreement": agreement, "mean_layers": mean_layers}
    return best


def calibrate_early_exit(model: CausalLM, prompts: Sequence[list[int]], spec: EarlyExitSpec,
                         vocab: Sequence[int] = (), log: Callable[[str], None] = lambda m: None,
                         new_tokens: int = 48) -> dict:  # fmt: skip
    """Generate the full model's greedy continuations, observe the exits, choose the threshold."""
    observed = []
    for index, prompt in enumerate(prompts):
        room = model.config.max_position_embeddings - len(prompt)
        output = generate_tokens(ReferenceStepper(model), prompt, max(1, min(new_tokens, room))).token_ids
        observed.append(observe_exits(model, prompt + output, len(prompt), spec, vocab))
        log(f"         calibration prompt {index + 1}/{len(prompts)}: {len(output)} positions")
    obs = ExitObservations(*(np.concatenate([getattr(o, f) for o in observed])
                             for f in ("confidence", "exit_tokens", "full_tokens")))  # fmt: skip
    choice = choose_threshold(obs, spec, model.config.num_layers)
    exit_agreement = (obs.exit_tokens == obs.full_tokens[:, None]).mean(0)
    return {**choice, "gate": spec.gate, "exits": list(spec.exits), "min_agreement": spec.min_agreement,
            "calibration_positions": int(len(obs.full_tokens)),
            "top1_agreement_by_exit": [round(float(a), 4) for a in exit_agreement],
            "num_layers": model.config.num_layers, "lossy": True}  # fmt: skip
