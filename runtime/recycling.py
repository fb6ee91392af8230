"""Token Recycling: draft from the target's own earlier top-k candidates (a free drafter).

Every verify step computes the target's logits at each tree node anyway; their top-k tokens are
what the target would likely say after that node's token. The drafter keeps, per token id, the
top-k candidates last seen after it (an adjacency table), and drafts the next tree by
breadth-first expansion from the last emitted token: a node's children are its token's row,
best first, as many as the tree shape gives it. Acceptance is decided by the target as for any
drafter, so decoding stays lossless; a stale or empty row only drafts less.

Two refinements over the paper's table. (1) A pair cache: the candidates last seen after a token
*and the token before it*, preferred over the token's own row when present (its proposals carry
evidence 2, so the gate measures their acceptance apart). A token's row mixes every context it
appeared in; a pair is nearly a context, so when the text repeats itself (copying, a function
called again) the pair row is the target's prediction for that very place. (2) The prompt's rows:
prefill computes the target's logits at every prompt token anyway, and all of them are recorded,
not only the last: copied text is then drafted as the target would continue it there. Simulated
on SmolLM2's greedy outputs (chain:4, recycling alone): copying 1.22 -> 1.38 tokens a step with the
prompt's rows, 1.49 with the pair cache too; code 1.21 -> 1.24 -> 1.27.

Memory is bounded by construction, allocated once, nothing grows with the text: one int32 row of
`width` candidates per vocabulary token (49152 x 8 x 4 bytes = 1.5 MB for SmolLM2), and a
direct-mapped pair cache of `PAIR_SLOTS` rows (an int64 key and an int32 row each: 2.6 MB; a new
pair overwrites whichever pair shared its slot).
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.drafters import Draft, draft_from
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import TreeShape

EMPTY = -1
PAIR_SLOTS = 1 << 16
LANES = 32  # the strided top-k's lane count (see `top_candidates`)
TABLE_FILE = "recycle_table.safetensors"  # a warm table in the artifact (compiler/drafters/recycle_warm.py)
STATE_ARRAYS = ("table", "pair_keys", "pair_rows")  # what a warm start saves


def top_candidates(logits: np.ndarray, width: int) -> np.ndarray:
    """[rows, width] token ids of each row's `width` largest logits, best first.

    Why not one argpartition over the vocabulary: at SmolLM2's V = 49152 it costs a noticeable
    share of a step for an 8-node tree (bench/results/README.md, free drafters). Instead the row is
    cut into `LANES` strided slices of V / LANES columns; an element-wise max over them
    (vectorised) gives each column's best, and the `width` best columns hold the `width` largest
    logits (each of those lies in a column whose best is at least as large, and fewer than `width`
    columns can beat it); the selection then runs on width x LANES values, several times faster
    on a tree's rows."""
    rows, vocab = logits.shape
    width = min(width, vocab)
    columns = vocab // LANES
    if vocab % LANES or columns < 4 * width:  # small or odd vocabularies: the direct way
        return best_first(logits, np.argpartition(-logits, width - 1, axis=-1)[:, :width])
    lanes = logits.reshape(rows, LANES, columns)  # column c holds ids c, c + columns, c + 2 columns...
    best = np.argpartition(-lanes.max(axis=1), width - 1, axis=-1)[:, :width]
    values = np.take_along_axis(lanes, best[:, None, :], axis=2).reshape(rows, LANES * width)
    ids = (best[:, None, :] + columns * np.arange(LANES)[None, :, None]).reshape(rows, LANES * width)
    part = np.argpartition(-values, width - 1, axis=-1)[:, :width]
    return best_first(logits, np.take_along_axis(ids, part, axis=-1))


def best_first(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`ids` [rows, width] of each row ordered by their logits, largest first (ties: lower place)."""
    order = np.argsort(-np.take_along_axis(logits, ids, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(ids, order, axis=-1)


class RecyclingDrafter:
    """Token Recycling over a fixed [vocab_size, width] table (see the module doc)."""

    name = "recycle"
    matched = 0  # the evidence of the last candidates: 2 from the pair cache, else 0 (one token)
    wants_logits = True  # the decoder hands it the verify step's logits (`observe_logits`)

    def __init__(self, vocab_size: int, width: int = 8, pair_slots: int = PAIR_SLOTS,
                 state: dict[str, np.ndarray] | None = None):  # fmt: skip
        self.table = np.full((vocab_size, width), EMPTY, dtype=np.int32)
        self.pair_keys = np.full(pair_slots, EMPTY, dtype=np.int64)  # previous * vocab + token
        self.pair_rows = np.full((pair_slots, width), EMPTY, dtype=np.int32)
        for name, warm in (state or {}).items():  # a warm start (the artifact's `state()`, any part)
            if name not in STATE_ARRAYS:
                raise ValueError(f"a recycling state has no array '{name}' (only {', '.join(STATE_ARRAYS)})")
            mine = getattr(self, name)
            if warm.shape != mine.shape or warm.dtype != mine.dtype:
                raise ValueError(f"a recycling {name} of shape {warm.shape} {warm.dtype} does not fit "
                                 f"{mine.shape} {mine.dtype}")  # fmt: skip
            mine[:] = warm  # copied into the arrays above: the memory bound holds

    def state(self) -> dict[str, np.ndarray]:
        """The arrays a warm start saves (safetensors): the token table and the pair cache."""
        return {name: getattr(self, name) for name in STATE_ARRAYS}

    @property
    def width(self) -> int:
        return self.table.shape[1]

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + self.pair_keys.nbytes + self.pair_rows.nbytes

    def pair_slot(self, keys: np.ndarray) -> np.ndarray:
        """Fibonacci hashing of pair keys onto the cache's slots."""
        mixed = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps: a multiplicative hash
        return (mixed >> np.uint64(40)).astype(np.int64) % len(self.pair_keys)

    def observe_logits(self, tokens: list[int], logits: np.ndarray,
                       previous: list[int] | None = None) -> None:  # fmt: skip
        """Node tokens [n] and the target's logits after each [n, V]: replace their rows; with the
        token before each node (`previous`, -1 where none), their pairs' rows too."""
        rows = top_candidates(logits, self.width)
        ids = np.asarray(tokens, dtype=np.int64)
        self.table[ids] = rows
        if previous is not None:
            before = np.asarray(previous, dtype=np.int64)
            known = before >= 0
            keys = before[known] * len(self.table) + ids[known]
            slots = self.pair_slot(keys)
            self.pair_keys[slots], self.pair_rows[slots] = keys, rows[known]

    def prepare(self, context: list[int]) -> None:
        """Nothing to do: the table is updated from the verify logits (`observe_logits`)."""

    def candidates(self, context: list[int], path: list[int], limit: int) -> list[int]:
        """The candidates recorded after the node's token and the one before it, else after the
        node's token alone (the last of context + path)."""
        sequence = context[-2:] + path
        row, self.matched = self.table[sequence[-1]], 0
        if len(sequence) > 1:
            key = sequence[-2] * len(self.table) + sequence[-1]
            slot = int(self.pair_slot(np.asarray([key]))[0])
            if self.pair_keys[slot] == key:
                row, self.matched = self.pair_rows[slot], 2
        return [int(t) for t in row[:limit] if t != EMPTY]

    def propose(self, context: list[int], shape: TreeShape, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:  # fmt: skip
        return draft_from(self, context, shape)
