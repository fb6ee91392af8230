"""Training an exit adapter by self-distillation (Kangaroo), on CPU in minutes.

Data (offline on every machine): Python's standard-library sources, cut into 128-token pieces, and
the target's own greedy continuations of the calibration prompts (its output distribution). One
teacher-forced eager pass per piece gives the residual stream after layer E (the adapter's input)
and the target's own next-token argmax (the label). The adapter is trained with cross-entropy
through the frozen final norm and (shrunk) head on positions whose label the head can produce.
Acceptance = top-1 agreement of adapter + head with the target on held-out continuations.
Checkpoints (safetensors, every `checkpoint_every` steps) make training resumable; batches are drawn
from a generator seeded by (seed, step), so a resumed run sees the batches an unbroken one would
(Adam's moments restart at a resume).
"""

from __future__ import annotations

import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from skiptree.compiler.drafters.self_draft_search import run_layers
from skiptree.models.base import CausalLM
from skiptree.models.exit_adapter import ExitAdapter, load_adapter, save_trained

PIECE = 128


@dataclass(frozen=True)
class TrainConfig:
    exit_layer: int
    vocab: tuple[int, ...]  # the tokens the draft head keeps (all of them when not shrunk)
    steps: int = 1500
    batch: int = 256
    lr: float = 1e-3
    inner: int = 1024
    seed: int = 0
    checkpoint_every: int = 250


def stdlib_pieces(encode: Callable[[str], list[int]], max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """128-token pieces of the standard library's sources (sorted file order), up to max_tokens."""
    pieces, files = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids = encode(path.read_text(errors="replace"))
        pieces += [ids[i : i + PIECE] for i in range(0, len(ids) - PIECE + 1, PIECE)]
        files.append(path.name)
        if len(pieces) * PIECE >= max_tokens:
            break
    return pieces[: max_tokens // PIECE], files


@torch.no_grad()
def teacher_forced(model: CausalLM, sequences: Sequence[tuple[int, list[int]]], exit_layer: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(hidden after layer E [N, H], the target's argmax [N]) at positions first-1.. of each sequence."""
    hidden, labels = [], []
    for first, sequence in sequences:
        states = run_layers(model, sequence, range(model.config.num_layers))
        hidden.append(states[exit_layer][first - 1 : -1])
        labels.append(model.finish(states[-1][first - 1 : -1]).argmax(-1))
    return torch.cat(hidden), torch.cat(labels)


def head_rows(model: CausalLM, vocab: torch.Tensor) -> torch.Tensor:
    return model.head.weight.detach()[vocab]


@torch.no_grad()
def agreement(adapter: ExitAdapter, model: CausalLM, vocab: torch.Tensor, hidden: torch.Tensor,
              labels: torch.Tensor) -> float:  # fmt: skip
    """Top-1 agreement with the target of norm(adapter(h)) through the (shrunk) head."""
    logits = model.norm(adapter(hidden)) @ head_rows(model, vocab).T
    return float((vocab[logits.argmax(-1)] == labels).float().mean())


def train_exit_adapter(model: CausalLM, train: tuple[torch.Tensor, torch.Tensor],
                       held_out: tuple[torch.Tensor, torch.Tensor], config: TrainConfig, checkpoint: Path,
                       data_record: dict[str, Any], log: Callable[[str], None] = print
                       ) -> dict[str, Any]:  # fmt: skip
    """Train (or resume) the adapter; returns its training record (also stored in the checkpoint)."""
    vocab = torch.tensor(config.vocab, dtype=torch.int64)
    rows = head_rows(model, vocab)
    index_of = torch.full((model.config.vocab_size,), -1, dtype=torch.int64)
    index_of[vocab] = torch.arange(len(vocab))
    hidden, labels = train
    usable = index_of[labels] >= 0  # positions whose label the (shrunk) head can produce
    hidden, targets = hidden[usable], index_of[labels[usable]]
    dtype = model.head.weight.dtype  # the adapter trains in the model's dtype (float64 in tests)
    adapter, record, start = ExitAdapter(model.config.hidden_size, config.inner, model.config.norm_eps), {}, 0
    untrained = agreement(adapter.to(dtype), model, vocab, *held_out)
    if Path(checkpoint).is_file():
        adapter, record = load_adapter(checkpoint)
        start = int(record.get("step", 0))
        log(f"resuming exit-adapter training at step {start} of {config.steps}")
    adapter = adapter.to(dtype).train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=0.0)
    model.requires_grad_(False)
    began = time.perf_counter()
    for step in tqdm(range(start, config.steps), desc="    training the exit adapter", initial=start,
                     total=config.steps, leave=False):  # fmt: skip
        batches = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # resumable order
        pick = torch.randint(len(targets), (config.batch,), generator=batches)
        logits = model.norm(adapter(hidden[pick])) @ rows.T
        loss = torch.nn.functional.cross_entropy(logits, targets[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            record = {**asdict(config), "vocab": len(config.vocab), "step": step + 1,
                      "loss": float(loss.detach()),
                      "norm_eps": model.config.norm_eps, "data": data_record,
                      "train_positions": int(len(targets)), "untrained_acceptance": untrained,
                      "seconds": record.get("seconds", 0.0) + time.perf_counter() - began}  # fmt: skip
            began = time.perf_counter()
            save_trained(adapter, checkpoint, record)
    adapter.eval()
    record = {**record, "held_out_acceptance": agreement(adapter, model, vocab, *held_out),
              "untrained_acceptance": untrained}  # fmt: skip
    save_trained(adapter, checkpoint, record)
    return record
