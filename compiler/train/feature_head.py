"""Training a feature-level draft head (EAGLE-3) by self-distillation, on CPU in minutes.

Data: sequences of tokens with the target's streams after the head's fused layers (low, middle, and
the last, `fused_layers`), concatenated [T, 3H], and its argmax y_t after each position (one
teacher-forced eager pass per sequence). The head sees the pairs (u_t, x_{t+1}) at positions t + 1,
u_t = fuse(streams_t), and is trained, as EAGLE-3, with a training-time test: it drafts
`1 + unroll` levels along each sequence exactly as the tree does, level l + 1 of the root at pair i
from level l's predicted g (in place of u) with the next true token, attending the true pairs up to
the root and its own earlier levels (one K/V cache of (1 + unroll) x n slots, a tree mask), and
every level is trained, through all of them, on
    cross-entropy of head(norm(g)) against the target's next token (shrunk head: positions whose
    label it can produce), plus an optional smooth-L1 regression of g on the last layer's stream at
    its position (in RMS units; EAGLE-3 drops it, `regression_weight` 0), which keeps g close to
    what the target's frozen norm and head read.
Acceptance = top-1 agreement with the target on held-out continuations at depths 1..3
(`acceptance_by_depth`: each level drafted as above, along the target's greedy path).
Checkpoints (safetensors, every `checkpoint_every` steps, with the optimizer's state beside them)
make training resumable, also in chunks of `max_seconds`; batches are drawn from a generator seeded
by (seed, step), so a resumed run sees the batches, and takes the steps, an unbroken one would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn import functional
from tqdm import tqdm

from skiptree.compiler.drafters.self_draft_search import run_layers
from skiptree.errors import SkiptreeError
from skiptree.models.base import CausalLM, mask_value
from skiptree.models.exit_adapter import load_trained, save_trained
from skiptree.models.feature_head import KIND, FeatureHead, draft_logits, fused_layers

DEPTHS = 3  # held-out acceptance is measured at depths 1..DEPTHS


@dataclass(frozen=True)
class FeatureTrainConfig:
    vocab: tuple[int, ...]  # the tokens the draft head keeps (all of them when not shrunk)
    steps: int = 800
    batch: int = 16  # sequences per step
    lr: float = 1e-3
    inner: int = 0  # the block's MLP width; 0: the target's
    regression_weight: float = 1.0
    unroll: int = 2  # draft levels trained on the head's own predicted features, after the first
    seed: int = 0
    checkpoint_every: int = 100
    max_seconds: float = 0.0  # > 0: return unfinished at the first checkpoint after this long (resumable)


@dataclass
class FeatureData:
    """Teacher-forced sequences: tokens [T], the streams after `layers` layers concatenated [T, 3H]
    (the last layer's last), the target's argmax [T], and where the scored part starts (the first
    generated position; 1 for plain text)."""

    tokens: list[torch.Tensor]
    features: list[torch.Tensor]
    labels: list[torch.Tensor]
    first: list[int]
    layers: tuple[int, ...] = ()

    @property
    def positions(self) -> int:
        return sum(len(t) - 1 for t in self.tokens)


@torch.no_grad()
def teacher_forced_features(model: CausalLM, sequences: Sequence[tuple[int, list[int]]]) -> FeatureData:
    last = model.config.num_layers
    data = FeatureData([], [], [], [], fused_layers(last))
    for first, sequence in sequences:
        states = run_layers(model, sequence, range(last))  # states[i]: after i layers
        data.tokens.append(torch.tensor(sequence))
        data.features.append(torch.cat([states[i] for i in data.layers], dim=-1))
        data.labels.append(model.finish(states[last]).argmax(-1))
        data.first.append(max(first, 1))
    return data


def draft_levels(head: FeatureHead, model: CausalLM, inputs: torch.Tensor, tokens: torch.Tensor, levels: int
                 ) -> list[torch.Tensor]:  # fmt: skip
    """The head's predicted features at draft levels 1..`levels` of every root along padded
    sequences tokens [B, T], inputs u [B, n, H] of the n = T - 1 pairs (pair i: (u_i, x_{i+1}) at
    position i + 1, slot i). Level 1 of root i is pair i; level l + 1 of root i takes level l's g with
    x_{i+l+1} at position i + l + 1, slot l n + i, and sees the pairs up to i and its own levels, as
    the tree's node would. Returns [B, n - l + 1, H] per level l (roots 0..n - l)."""
    batch, pairs = tokens.shape[0], tokens.shape[1] - 1
    slots, dtype = levels * pairs, inputs.dtype
    shape = (batch, model.config.num_kv_heads, slots, model.config.head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    roots = torch.arange(pairs)
    visible = torch.zeros(pairs, slots, dtype=torch.bool)
    visible[:, :pairs] = roots[None, :] <= roots[:, None]  # the true pairs up to the root
    outputs, features = [], inputs
    for level in range(1, levels + 1):
        count = pairs - level + 1
        if count <= 0:
            break
        rows, write_slots = roots[:count], (level - 1) * pairs + roots[:count]
        visible[rows, write_slots] = True  # a node sees itself (and, from here on, deeper ones see it)
        positions = (rows + level).expand(batch, -1)
        embedded, context = model.embed_step(tokens[:, level : level + count], positions)
        bias = torch.zeros(1, 1, count, slots, dtype=dtype).masked_fill(~visible[:count], mask_value(dtype))
        # fresh cache tensors per level: the layer writes K/V in place, and autograd keeps the old ones
        k_cache, v_cache = k_cache.clone(), v_cache.clone()
        features = head(features[:, :count], embedded, context, bias, k_cache, v_cache, write_slots)
        outputs.append(features)
    return outputs


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
def acceptance_by_depth(head: FeatureHead, model: CausalLM, vocab: torch.Tensor, data: FeatureData,
                        depths: int = DEPTHS) -> list[float]:  # fmt: skip
    """Top-1 agreement with the target of the head's draft at depth 1..`depths` below each scored
    root, drafting on its own features along the target's greedy path (`draft_levels`): depth d
    given that the d - 1 drafts before it were the target's tokens."""
    agree, total = [0] * depths, [0] * depths
    for i in range(len(data.tokens)):
        tokens, labels, first = data.tokens[i][None], data.labels[i], data.first[i]
        inputs = head.fuse_streams(data.features[i][None, :-1])
        for level, predicted in enumerate(draft_levels(head, model, inputs, tokens, depths), start=1):
            drafted = vocab[draft_logits(model, predicted, vocab).argmax(-1)][0]
            expected = labels[level : level + len(drafted)]  # root j's draft at this depth: labels[j + level]
            scored = slice(first - 1, None)  # roots whose path is the target's own continuation
            agree[level - 1] += int((drafted[scored] == expected[scored]).sum())
            total[level - 1] += len(expected[scored])
    return [a / max(t, 1) for a, t in zip(agree, total, strict=True)]


def _optimizer_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".optimizer.safetensors")


def save_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Path, step: int) -> None:
    """AdamW's moments beside the checkpoint (a resumed run then takes the steps an unbroken one would)."""
    tensors = {f"{index}.{name}": value.detach().contiguous() for index, state in
               optimizer.state_dict()["state"].items() for name, value in state.items()}  # fmt: skip
    path = _optimizer_path(checkpoint)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(path)


def load_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Path, step: int) -> None:
    """Restore the moments saved at `step` (none, or another step's: the optimizer starts afresh)."""
    path = _optimizer_path(checkpoint)
    if not path.is_file():
        return
    with safe_open(str(path), "pt") as handle:
        if (handle.metadata() or {}).get("step") != str(step):
            return
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({**optimizer.state_dict(), "state": state})


def _level_losses(head: FeatureHead, model: CausalLM, batch: tuple[torch.Tensor, ...], vocab: torch.Tensor,
                  index_of: torch.Tensor, levels: int, scale: torch.Tensor
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """(cross-entropy, regression) of each draft level on a batch (levels without a usable label skipped)."""
    tokens, features, labels, mask = batch
    hidden = model.config.hidden_size
    last = features[..., -hidden:]  # the last layer's stream, the regression target
    losses = []
    for level, predicted in enumerate(draft_levels(head, model, head.fuse_streams(features[:, :-1]), tokens,
                                                   levels), start=1):  # fmt: skip
        count = predicted.shape[1]
        real, targets = mask[:, level : level + count], index_of[labels[:, level : level + count]]
        usable = real & (targets >= 0)
        if not usable.any():
            continue
        loss = functional.cross_entropy(draft_logits(model, predicted[usable], vocab), targets[usable])
        goal = last[:, level : level + count][real] / scale
        losses.append((loss, functional.smooth_l1_loss(predicted[real] / scale, goal)))
    return losses


def train_feature_head(model: CausalLM, train: FeatureData, held_out: FeatureData, config: FeatureTrainConfig,
                       checkpoint: Path, data_record: dict[str, Any], log: Callable[[str], None] = print
                       ) -> dict[str, Any]:  # fmt: skip
    """Train (or resume) the head; returns its training record (also stored in the checkpoint),
    with "finished": False when `max_seconds` ran out first (call again to go on)."""
    called = time.perf_counter()
    vocab = torch.tensor(config.vocab, dtype=torch.int64)
    index_of = torch.full((model.config.vocab_size,), -1, dtype=torch.int64)
    index_of[vocab] = torch.arange(len(vocab))
    dtype = model.head.weight.dtype
    torch.manual_seed(config.seed)
    head, record, start = FeatureHead(model.config, config.inner or None, train.layers).to(dtype), {}, 0
    if Path(checkpoint).is_file():
        tensors, record = load_trained(checkpoint, KIND)
        stored = tensors["feature_layers"].tolist() if "feature_layers" in tensors else []
        if stored != list(train.layers):
            fix = "delete it, or train in a new --session DIR"
            raise SkiptreeError(f"{checkpoint} holds a feature head fusing layers {stored}, not "
                                f"{list(train.layers)}", fix)  # fmt: skip
        head.load_state_dict(tensors)
        start = int(record.get("step", 0))
        log(f"resuming feature-head training at step {start} of {config.steps}")
    untrained = record.get("untrained_acceptance")
    if untrained is None:
        untrained = acceptance_by_depth(head.eval(), model, vocab, held_out, 1)[0]
    hidden = model.config.hidden_size  # the regression in RMS units of the last layer's stream
    squares = sum(float(f[..., -hidden:].double().pow(2).sum()) for f in train.features)
    scale = torch.tensor((squares / (train.positions + len(train.tokens)) / hidden) ** 0.5, dtype=dtype)
    optimizer = torch.optim.AdamW(head.train().parameters(), lr=config.lr, weight_decay=0.0)
    if start:
        load_optimizer(optimizer, checkpoint, start)
    model.requires_grad_(False)
    began = time.perf_counter()
    for step in tqdm(range(start, config.steps), desc="    training the feature head", initial=start,
                     total=config.steps, leave=False):  # fmt: skip
        batches = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # resumable order
        pick = torch.randint(len(train.tokens), (config.batch,), generator=batches).tolist()
        losses = _level_losses(head, model, _batch(train, pick), vocab, index_of, 1 + config.unroll, scale)
        optimizer.zero_grad()
        if losses:  # none: no label the (shrunk) head can produce in this batch
            sum(loss + config.regression_weight * regression for loss, regression in losses).backward()
            optimizer.step()
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            record = {**asdict(config), "vocab": len(config.vocab), "step": step + 1, "kind": KIND,
                      "feature_layers": list(train.layers), "finished": step + 1 == config.steps,
                      "loss": float(losses[0][0].detach()) if losses else None,
                      "regression": float(losses[0][1].detach()) if losses else None,
                      "loss_by_level": [float(loss.detach()) for loss, _ in losses],
                      "data": data_record, "train_positions": train.positions,
                      "untrained_acceptance": untrained,
                      "seconds": record.get("seconds", 0.0) + time.perf_counter() - began}  # fmt: skip
            began = time.perf_counter()
            save_optimizer(optimizer, checkpoint, step + 1)
            save_trained(head, checkpoint, record)
            out_of_time = config.max_seconds > 0 and time.perf_counter() - called >= config.max_seconds
            if out_of_time and step + 1 < config.steps:
                log(f"feature-head training stopped at step {step + 1} of {config.steps} after "
                    f"{config.max_seconds:.0f} s: run again to resume")  # fmt: skip
                return record
    depths = acceptance_by_depth(head.eval(), model, vocab, held_out)
    record = {**record, "held_out_acceptance": depths[0], "held_out_acceptance_by_depth": depths,
              "untrained_acceptance": untrained, "finished": True}  # fmt: skip
    save_trained(head, checkpoint, record)
    return record
