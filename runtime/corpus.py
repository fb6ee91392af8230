"""Corpus lookup (REST-style): draft what followed the context's longest match in a datastore.

The datastore is a token array built at compile time from user-given text (a code base, a set of
documents) and its suffix array: the start positions of all suffixes, sorted lexicographically.
All occurrences of a pattern then form one contiguous range of the suffix array, found by binary
search, and within that range the suffixes are sorted by their next token too. A step:

  1. the longest suffix of the context (at most `max_match`, at least `min_match` tokens) that
     occurs in the corpus gives a range [lo, hi) of occurrences;
  2. a node's children are the tokens that followed the match (plus the node's path) most often,
     and each child narrows the range to the occurrences it continues: a trie of continuations,
     read off the sorted range without building it.

Documents are joined with a separator (`SEPARATOR`, never proposed, never matched across).
Memory: 8 bytes per corpus token (int32 tokens + int32 suffix array), at most `MAX_CORPUS_TOKENS`.
"""

from __future__ import annotations

import numpy as np

from skiptree.runtime.drafters import Draft, draft_from
from skiptree.runtime.sampling import SamplingConfig
from skiptree.runtime.tree import TreeShape

SEPARATOR = -1  # between documents; sorts before every token, so suffix order stays consistent
MAX_CORPUS_TOKENS = 16_000_000  # 128 MB of tokens + suffix array
CORPUS_FILE = "corpus.safetensors"
SCAN_LIMIT = 4096  # occurrences counted per node (a frequent short match has many)


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Start positions of all suffixes of `tokens` (ints >= -1) in lexicographic order, a suffix
    that ends counting as smaller than any token. Prefix doubling: O(n log n) sorts of n keys."""
    count = len(tokens)
    if count == 0:
        return np.zeros(0, dtype=np.int32)
    _, rank = np.unique(tokens, return_inverse=True)
    rank = rank.astype(np.int64)
    span = 1
    while True:
        second = np.full(count, -1, dtype=np.int64)
        second[: count - span] = rank[span:] if span < count else second[:0]
        key = rank * (count + 1) + (second + 1)  # < (n + 1)^2: fits int64 for n <= MAX_CORPUS_TOKENS
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        new_rank = np.empty(count, dtype=np.int64)
        new_rank[order] = np.concatenate(([0], np.cumsum(sorted_key[1:] != sorted_key[:-1])))
        rank = new_rank
        if rank.max() == count - 1 or span >= count:
            return order.astype(np.int32)
        span *= 2


class CorpusIndex:
    """Tokens and their suffix array; `match` and `continuations` answer the drafter's queries."""

    def __init__(self, tokens: np.ndarray, suffixes: np.ndarray):
        if tokens.shape != suffixes.shape or tokens.dtype != np.int32 or suffixes.dtype != np.int32:
            raise ValueError("a corpus needs int32 tokens and an int32 suffix array of the same length")
        self.tokens, self.suffixes = tokens, suffixes

    @classmethod
    def build(cls, documents: list[list[int]]) -> CorpusIndex:
        parts: list[int] = []
        for document in documents:
            parts.extend(document)
            parts.append(SEPARATOR)
        if len(parts) > MAX_CORPUS_TOKENS:
            raise ValueError(f"the corpus has {len(parts):,} tokens, over the limit of {MAX_CORPUS_TOKENS:,}")
        tokens = np.asarray(parts, dtype=np.int32)
        return cls(tokens, suffix_array(tokens))

    def __len__(self) -> int:
        return len(self.tokens)

    def token_at(self, rows: np.ndarray, offset: int) -> np.ndarray:
        """The token `offset` after the starts of suffix-array rows (SEPARATOR past the end)."""
        positions = self.suffixes[rows].astype(np.int64) + offset
        inside = positions < len(self.tokens)
        return np.where(inside, self.tokens[np.minimum(positions, len(self.tokens) - 1)], SEPARATOR)

    def _bound(self, pattern: list[int], lo: int, hi: int, upper: bool) -> int:
        """First row in [lo, hi) whose suffix is >= pattern (> pattern when `upper`), on the
        pattern's length."""
        size = len(pattern)
        while lo < hi:
            mid = (lo + hi) // 2
            start = int(self.suffixes[mid])
            head = self.tokens[start : start + size].tolist()
            if head < pattern or (upper and head == pattern):
                lo = mid + 1
            else:
                hi = mid
        return lo

    def find(self, pattern: list[int]) -> tuple[int, int]:
        """The suffix-array rows [lo, hi) of the pattern's occurrences (lo == hi: none)."""
        lo = self._bound(pattern, 0, len(self.suffixes), upper=False)
        return lo, self._bound(pattern, lo, len(self.suffixes), upper=True)

    def match(self, context: list[int], max_match: int, min_match: int) -> tuple[int, int, int]:
        """(lo, hi, length) of the longest context suffix of `min_match`..`max_match` tokens that
        occurs; length 0 when none does. Shortest first: a suffix that does not occur cannot be
        part of a longer one that does, so the search stops at the first miss (a chat context
        matches 2-4 tokens: a few binary searches a step instead of 15)."""
        best = (0, 0, 0)
        for length in range(min_match, min(max_match, len(context)) + 1):
            lo, hi = self.find(context[-length:])
            if hi == lo:
                break
            best = (lo, hi, length)
        return best

    def continuations(self, lo: int, hi: int, offset: int, limit: int) -> list[tuple[int, int, int]]:
        """The most frequent tokens at `offset` within rows [lo, hi), as (token, lo, hi) of the rows
        each continues (sorted by that token within the range), most frequent first."""
        hi = min(hi, lo + SCAN_LIMIT)
        following = self.token_at(np.arange(lo, hi), offset)  # sorted: the rows share `offset` tokens
        values, starts, counts = np.unique(following, return_index=True, return_counts=True)
        keep = values != SEPARATOR
        values, starts, counts = values[keep], starts[keep], counts[keep]
        best = np.argsort(-counts, kind="stable")[:limit]
        return [(int(values[i]), lo + int(starts[i]), lo + int(starts[i] + counts[i])) for i in best]


class CorpusDrafter:
    """Draft the continuations of the context's longest corpus match (see the module doc)."""

    name = "corpus"
    matched = 0

    def __init__(self, index: CorpusIndex, max_match: int = 16, min_match: int = 2):
        self.index, self.max_match, self.min_match = index, max_match, min_match
        self.ranges: dict[tuple[int, ...], tuple[int, int, int]] = {}  # path -> (lo, hi, offset)

    def prepare(self, context: list[int]) -> None:
        lo, hi, length = self.index.match(context, self.max_match, self.min_match)
        self.ranges = {(): (lo, hi, length)} if hi > lo else {}

    def candidates(self, context: list[int], path: list[int], limit: int) -> list[int]:
        found = self.ranges.get(tuple(path))
        self.matched = 0 if found is None else found[2]  # the match grows with the path
        if found is None:
            return []
        lo, hi, offset = found
        options = self.index.continuations(lo, hi, offset, limit)
        for token, child_lo, child_hi in options:
            self.ranges[(*path, token)] = (child_lo, child_hi, offset + 1)
        return [token for token, _, _ in options]

    def propose(self, context: list[int], shape: TreeShape, sampling: SamplingConfig,
                rng: np.random.Generator) -> Draft:  # fmt: skip
        return draft_from(self, context, shape)
