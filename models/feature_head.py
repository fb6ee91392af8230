"""The feature-level draft head (EAGLE): one small decoder block that drafts on the target's features.

    g_{t+1} = block(fc([f_t ; embed(x_{t+1})]))        draft logits = head(norm(g_{t+1}))

f_t is the target's last hidden state (before the final norm) at position t, which the verify graph
returns for every node it ran (`features`); x_{t+1} is the token after it. Deeper drafts continue on
the head's own output g in place of f. The block is one decoder layer of the target's own
architecture (Llama) with a one-layer K/V cache of its own; the embedding, the final norm and the
output head are the target's, frozen (the head possibly shrunk to frequent tokens).

A pair (feature of position p - 1, token at p) sits at position p and in cache slot p - 1: the first
token of a sequence has no feature before it and is never a query. Training and drafting use the
same layout, so what the head attends to is the same in both.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skiptree.errors import SkiptreeError
from skiptree.models.base import CausalLM
from skiptree.models.config import ModelConfig
from skiptree.models.exit_adapter import load_trained
from skiptree.models.llama import LlamaLayer

KIND = "feature-head"


def check_family(config: ModelConfig) -> None:
    if config.family != "llama":
        raise SkiptreeError(f"feature-head drafts are built for the Llama family, not {config.model_type}",
                            "use --draft prompt-lookup or a draft model for this architecture")  # fmt: skip


class FeatureHead(nn.Module):
    """fc [2H -> H] then one Llama decoder layer (`inner`: its MLP width, default the target's)."""

    def __init__(self, config: ModelConfig, inner: int | None = None):
        super().__init__()
        check_family(config)
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = LlamaLayer(replace(config, intermediate_size=inner or config.intermediate_size))

    def forward(self, features: torch.Tensor, embedded: torch.Tensor, context: tuple, attn_bias: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, write_slots: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        """features, embedded [B, T, H] -> the predicted next features [B, T, H]; writes K/V in place."""
        x = self.fc(torch.cat([features, embedded], dim=-1))
        return self.layer(x, context, attn_bias, k_cache, v_cache, write_slots)


def draft_logits(model: CausalLM, predicted: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of predicted features through the target's norm and head (rows `vocab` only)."""
    normed = model.norm(predicted)
    if vocab is None:
        return model.head(normed)
    return normed @ model.head.weight[vocab].T


def load_feature_head(path: Path, config: ModelConfig) -> tuple[FeatureHead, dict[str, Any]]:
    """A trained head for a target with `config`; refused clearly if it was trained for another shape."""
    tensors, record = load_trained(path, KIND)
    fc = tensors.get("fc.weight")
    if fc is None or tuple(fc.shape) != (config.hidden_size, 2 * config.hidden_size):
        raise SkiptreeError(f"{path} is not a feature head for this model (hidden size {config.hidden_size})",
                            f"train one for this target with skiptree tune TARGET --train-draft {KIND}")
    head = FeatureHead(config, int(tensors["layer.mlp.gate.weight"].shape[0]))
    head.load_state_dict(tensors)
    return head.eval(), record
