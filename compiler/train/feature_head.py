"""Training a feature-level draft head (EAGLE) by self-distillation, on CPU in minutes.

Data: sequences of tokens with the target's last-layer features f_t and its argmax y_t after each
position (one teacher-forced eager pass per sequence). For a sequence the head sees the pairs
(f_t, x_{t+1}) at positions t + 1 and is trained, as in EAGLE, on two losses at once:
    cross-entropy of head(norm(g_{t+1})) against y_{t+1} (the target's next token; shrunk head:
    positions whose label it can produce), plus a smooth-L1 regression of g_{t+1} on f_{t+1}
    (features scaled by their RMS), which keeps drafting on its own features on track.
Measured on SmolLM2: the regression alone leaves the predictions far from the features (cosine
0.4), so a second draft from them was accepted 5% of the time. So, like EAGLE-3's training-time
test, each step also runs `unroll` more passes whose inputs are the head's own predictions (the
first position keeps its true feature), with the same losses, trained through both passes.
Acceptance = top-1 agreement of the first draft token with the target on held-out continuations.
Checkpoints (safetensors, every `checkpoint_every` steps) make training resumable; batches are drawn
from a generator seeded by (seed, step), so a resumed run sees the batches an unbroken one would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional
from tqdm import tqdm

from skiptree.compiler.drafters.self_draft_search import run_layers
from skiptree.models.base import CausalLM
from skiptree.models.exit_adapter import load_trained, save_trained
from skiptree.models.feature_head import KIND, FeatureHead, draft_logits
from skiptree.models.reference import causal_bias


@dataclass(frozen=True)
class FeatureTrainConfig:
    vocab: tuple[int, ...]  # the tokens the draft head keeps (all of them when not shrunk)
    steps: int = 800
    batch: int = 16  # sequences per step
    lr: float = 1e-3
    inner: int = 0  # the block's MLP width; 0: the target's
    regression_weight: float = 1.0
    unroll: int = 1  # extra passes on the head's own predicted features (deeper drafts), trained through
    seed: int = 0
    checkpoint_every: int = 100


@dataclass
class FeatureData:
    """Teacher-forced sequences: tokens [T], features [T, H], the target's argmax [T], and where
    the scored part starts (the first generated position; 1 for plain text)."""

    tokens: list[torch.Tensor]
    features: list[torch.Tensor]
    labels: list[torch.Tensor]
    first: list[int]

    @property
    def positions(self) -> int:
        return sum(len(t) - 1 for t in self.tokens)


@torch.no_grad()
def teacher_forced_features(model: CausalLM, sequences: Sequence[tuple[int, list[int]]]) -> FeatureData:
    data = FeatureData([], [], [], [])
    last = model.config.num_layers
    for first, sequence in sequences:
        features = run_layers(model, sequence, range(last))[-1]
        data.tokens.append(torch.tensor(sequence))
        data.features.append(features)
        data.labels.append(model.finish(features).argmax(-1))
        data.first.append(max(first, 1))
    return data


def run_head(head: FeatureHead, model: CausalLM, features: torch.Tensor, tokens: torch.Tensor
             ) -> torch.Tensor:  # fmt: skip
    """Predicted features [B, T - 1, H] for the pairs (f_t, x_{t+1}) of padded sequences [B, T]."""
    batch, steps = tokens.shape[0], tokens.shape[1] - 1
    positions = torch.arange(1, steps + 1).expand(batch, steps)
    embedded, context = model.embed_step(tokens[:, 1:], positions)
    dtype = features.dtype
    shape = (batch, model.config.num_kv_heads, steps, model.config.head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    bias = causal_bias(0, steps, steps, dtype)
    return head(features[:, :-1], embedded, context, bias, k_cache, v_cache, torch.arange(steps))


def _batch(data: FeatureData, pick: list[int]) -> tuple[torch.Tensor, ...]:
    """Right-padded tokens, features, labels and a mask of real positions (causal: pads come last)."""
    longest = max(len(data.tokens[i]) for i in pick)
    tokens = torch.zeros(len(pick), longest, dtype=torch.int64)
    features = torch.zeros(len(pick), longest, data.features[0].shape[-1], dtype=data.features[0].dtype)
    labels = torch.zeros(len(pick), longest, dtype=torch.int64)
    mask = torch.zeros(len(pick), longest, dtype=torch.bool)
    for row, i in enumerate(pick):
        size = len(data.tokens[i])
        tokens[row, :size], labels[row, :size] = data.tokens[i], data.labels[i]
        features[row, :size], mask[row, :size] = data.features[i], True
    return tokens, features, labels, mask


@torch.no_grad()
def feature_agreement(head: FeatureHead, model: CausalLM, vocab: torch.Tensor, data: FeatureData) -> float:
    """Top-1 agreement of the head's first draft token with the target, over scored positions."""
    agree = total = 0
    for i in range(len(data.tokens)):
        tokens, features, labels = data.tokens[i][None], data.features[i][None], data.labels[i]
        predicted = vocab[draft_logits(model, run_head(head, model, features, tokens), vocab).argmax(-1)][0]
        scored = slice(data.first[i] - 1, None)  # pair t predicts labels[t + 1]
        agree += int((predicted[scored] == labels[1:][scored]).sum())
        total += len(labels[1:][scored])
    return agree / max(total, 1)


def train_feature_head(model: CausalLM, train: FeatureData, held_out: FeatureData, config: FeatureTrainConfig,
                       checkpoint: Path, data_record: dict[str, Any], log: Callable[[str], None] = print
                       ) -> dict[str, Any]:  # fmt: skip
    """Train (or resume) the head; returns its training record (also stored in the checkpoint)."""
    vocab = torch.tensor(config.vocab, dtype=torch.int64)
    index_of = torch.full((model.config.vocab_size,), -1, dtype=torch.int64)
    index_of[vocab] = torch.arange(len(vocab))
    dtype = model.head.weight.dtype
    torch.manual_seed(config.seed)
    head, record, start = FeatureHead(model.config, config.inner or None).to(dtype), {}, 0
    untrained = feature_agreement(head.eval(), model, vocab, held_out)
    if Path(checkpoint).is_file():
        tensors, record = load_trained(checkpoint, KIND)
        head.load_state_dict(tensors)
        start = int(record.get("step", 0))
        log(f"resuming feature-head training at step {start} of {config.steps}")
    scale = torch.cat(train.features).pow(2).mean().sqrt()  # regression in RMS units
    optimizer = torch.optim.AdamW(head.train().parameters(), lr=config.lr, weight_decay=0.0)
    model.requires_grad_(False)
    began = time.perf_counter()
    for step in tqdm(range(start, config.steps), desc="    training the feature head", initial=start,
                     total=config.steps, leave=False):  # fmt: skip
        batches = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # resumable order
        pick = torch.randint(len(train.tokens), (config.batch,), generator=batches).tolist()
        tokens, features, labels, mask = _batch(train, pick)
        real, targets = mask[:, 1:], index_of[labels[:, 1:]]
        usable = real & (targets >= 0)
        total, inputs = torch.zeros(()), features
        for _ in range(1 + config.unroll):
            predicted = run_head(head, model, inputs, tokens)
            loss = functional.cross_entropy(draft_logits(model, predicted[usable], vocab), targets[usable])
            regression = functional.smooth_l1_loss(predicted[real] / scale, features[:, 1:][real] / scale)
            total = total + loss + config.regression_weight * regression
            # the next pass drafts from the head's own predictions, as deeper tree levels do
            inputs = torch.cat([features[:, :1], predicted], dim=1)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            record = {**asdict(config), "vocab": len(config.vocab), "step": step + 1, "kind": KIND,
                      "loss": float(loss.detach()), "regression": float(regression.detach()),
                      "data": data_record, "train_positions": train.positions,
                      "untrained_acceptance": untrained,
                      "seconds": record.get("seconds", 0.0) + time.perf_counter() - began}  # fmt: skip
            began = time.perf_counter()
            save_trained(head, checkpoint, record)
    record = {**record, "held_out_acceptance": feature_agreement(head.eval(), model, vocab, held_out),
              "untrained_acceptance": untrained}  # fmt: skip
    save_trained(head, checkpoint, record)
    return record
