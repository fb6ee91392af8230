"""Warm start for Token Recycling: the target's own candidates on calibration prompts, at compile time.

The table (`skiptree.runtime.recycling`) starts empty and fills as decoding runs; an artifact can
instead start from what the target predicts after every token of the calibration prompts and of
its greedy answers to them (eager torch, a few seconds): the token table and the pair cache (each
token with the one before it). Saved as `recycle_table.safetensors` (int32 rows, int64 pair keys;
no pickle; 4.2 MB at SmolLM2's vocabulary) and checked by the manifest's sha256 like every artifact file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from skiptree.models.base import CausalLM
from skiptree.models.reference import ReferenceStepper
from skiptree.runtime.manifest import RecycleEntry
from skiptree.runtime.recycling import EMPTY, TABLE_FILE, RecyclingDrafter


def warm_state(model: CausalLM, prompts: list[list[int]], max_seq_len: int, new_tokens: int = 32,
               width: int = 8) -> dict[str, np.ndarray]:  # fmt: skip
    """The drafter's arrays (the [vocab, width] table and the pair cache) after observing each
    prompt and `new_tokens` greedy tokens, every token with the one before it."""
    drafter = RecyclingDrafter(model.config.vocab_size, width)
    stepper = ReferenceStepper(model, max_seq_len=max_seq_len)
    with torch.no_grad():
        for ids in prompts:
            ids = ids[: max_seq_len - 1]
            stepper.length = 0
            logits = stepper.forward(ids).float().numpy()
            drafter.observe_logits(ids, logits, [EMPTY, *ids[:-1]])
            previous, token = ids[-1], int(np.argmax(logits[-1]))
            for _ in range(min(new_tokens, max_seq_len - len(ids) - 1)):
                row = stepper.decode(token)
                drafter.observe_logits([token], row[None], [previous])
                previous, token = token, int(np.argmax(row))
    return drafter.state()


def write_warm_table(model: CausalLM, prompts: list[list[int]], folder: Path, max_seq_len: int
                     ) -> RecycleEntry:  # fmt: skip
    """Warm the table and pair cache into `folder`; returns the manifest's `recycle` entry."""
    state = warm_state(model, prompts, max_seq_len)
    save_file(state, str(Path(folder) / TABLE_FILE))
    return RecycleEntry(file=TABLE_FILE, width=int(state["table"].shape[1]), warm_prompts=len(prompts),
                        rows_filled=int((state["table"][:, 0] != EMPTY).sum()),
                        pairs_filled=int((state["pair_keys"] != EMPTY).sum()))  # fmt: skip
