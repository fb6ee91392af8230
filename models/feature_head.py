"""The feature-level draft head (EAGLE-3): one small decoder block that drafts on the target's features.

    u_t = fuse([h^low_t ; h^mid_t ; h^high_t])        [3H] -> [H], the fused feature of position t
    g_{t+1} = block(fc([u_t ; embed(x_{t+1})]))        draft logits = head(norm(g_{t+1}))

h^i_t is the target's residual stream after its first i layers at position t (`fused_layers`:
i = min(2, L // 4), L // 2 and L, the last one before the final norm), which the verify graph fuses
and returns for every node it ran (`features`, see passes/insert_tree_verify.py); x_{t+1} is the
token after it. Deeper drafts continue on the head's own output g in place of u (EAGLE-3). The block
is one decoder layer of the target's own architecture (Llama) with a one-layer K/V cache of its
own; the embedding, the final norm and the output head are the target's, frozen (the head possibly
shrunk to frequent tokens). The layers are stored with the weights (`feature_layers`), so training
and the verify graph agree. An EAGLE-1 head (no `fuse`, trained before fusion) still loads: it
drafts from the last layer's stream, u_t = h^L_t.

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


def fused_layers(num_layers: int) -> tuple[int, int, int]:
    """The low, middle and high streams fused (layers run before each; L = the last layer's output).
    EAGLE-3 takes the inputs of layers 2, L // 2 and L - 3; the high one here is the last layer's
    output, whose norm and head are the target's own prediction (SmolLM2, L = 30: 2, 15, 30)."""
    return min(2, num_layers // 4), num_layers // 2, num_layers


class FeatureHead(nn.Module):
    """fuse [3H -> H] (EAGLE-3), fc [2H -> H], then one Llama decoder layer (`inner`: its MLP width,
    default the target's). `layers`: the fused streams (default `fused_layers`); () for an EAGLE-1
    head, which has no `fuse` and takes the last layer's stream as it is."""

    def __init__(self, config: ModelConfig, inner: int | None = None, layers: tuple[int, ...] | None = None):
        super().__init__()
        check_family(config)
        hidden = config.hidden_size
        layers = fused_layers(config.num_layers) if layers is None else tuple(layers)
        if layers and (len(layers) != 3 or not all(0 <= i <= config.num_layers for i in layers)):
            raise ValueError(f"a feature head fuses three streams of 0..{config.num_layers}, not {layers}")
        self.fuse = nn.Linear(3 * hidden, hidden, bias=False) if layers else None
        if layers:  # stored with the weights: the verify graph fuses the streams training fused
            self.register_buffer("feature_layers", torch.tensor(layers, dtype=torch.int64))
        self.layers = layers or (config.num_layers,)  # the streams `fuse_streams` takes, in order
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        self.layer = LlamaLayer(replace(config, intermediate_size=inner or config.intermediate_size))

    def fuse_streams(self, streams: torch.Tensor) -> torch.Tensor:
        """The target's streams at `self.layers`, concatenated [..., 3H] ([..., H] unfused) -> u [..., H]."""
        return streams if self.fuse is None else self.fuse(streams)

    def forward(self, features: torch.Tensor, embedded: torch.Tensor, context: tuple, attn_bias: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, write_slots: torch.Tensor
                ) -> torch.Tensor:  # fmt: skip
        """features (u or g), embedded [B, T, H] -> the predicted next features g [B, T, H]; writes K/V."""
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
    hidden = config.hidden_size
    fc, fuse = tensors.get("fc.weight"), tensors.get("fuse.weight")
    layers = tuple(int(i) for i in tensors["feature_layers"]) if "feature_layers" in tensors else ()
    fits = fc is not None and tuple(fc.shape) == (hidden, 2 * hidden)
    fits &= (fuse is None and not layers) or (fuse is not None and tuple(fuse.shape) == (hidden, 3 * hidden))
    fits &= not layers or (len(layers) == 3 and all(0 <= i <= config.num_layers for i in layers))
    if not fits:
        fix = f"train one for this target with skiptree tune TARGET --train-draft {KIND}"
        raise SkiptreeError(f"{path} is not a feature head for this model (hidden size {hidden}, "
                            f"{config.num_layers} layers)", fix)  # fmt: skip
    head = FeatureHead(config, int(tensors["layer.mlp.gate.weight"].shape[0]), layers)
    head.load_state_dict(tensors)
    return head.eval(), record
