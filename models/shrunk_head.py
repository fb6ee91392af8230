"""An output head restricted to some token ids (ShrinkDraftVocab, early-exit heads).

It stores a copy of those rows (gathering them at run time would read the whole head) and returns
full-width logits with the minimum bias outside the kept ids, so an argmax is a real token id and a
softmax gives the other tokens probability 0: drafters, gates and sampling need no changes.
"""

from __future__ import annotations

import torch
from torch import nn

from skiptree.models.base import CausalLM, mask_value


class ShrunkHead(nn.Module):
    def __init__(self, model: CausalLM, vocab: torch.Tensor):
        super().__init__()
        self.vocab_size = model.config.vocab_size
        self.register_buffer("vocab", vocab.clone())
        self.rows = nn.Linear(model.config.hidden_size, len(vocab), bias=False)
        self.rows.weight = nn.Parameter(model.head.weight.detach()[vocab].clone(), requires_grad=False)

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, T, H] -> logits [B, T, V] (kept ids only)."""
        small = self.rows(normed)
        full = torch.full((*small.shape[:2], self.vocab_size), mask_value(small.dtype), dtype=small.dtype)
        return full.scatter(-1, self.vocab.expand(*small.shape[:2], -1), small)
