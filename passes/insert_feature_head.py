"""InsertFeatureHead: add the "feature_draft" graph, a trained feature-level draft head (EAGLE-3).

See models/feature_head.py for the head. The graph is one draft step over any number of tokens
(a catch-up of several accepted tokens, or one tree level), with the step contract plus features:

    feature_draft(features [1, T, H], input_ids, positions, attn_bias, write_slots, k0, v0)
        -> logits [1, T, V], next_ids [1, T], next_features [1, T, H] (predicted), k0_out, v0_out

`features` is the head's input per pair: for a catch-up, the verify graph's `features` (the fused
u of an EAGLE-3 head, which InsertTreeVerify computes in the target's pass: this pass leaves the head
on the IR for it, `ir.draft_adapters["feature_draft"]`; an EAGLE-1 head's is the last layer); for a
tree level, the parents' `next_features`. k0/v0 are the head's own one-layer cache (the runtime
gives it its own buffers, not the target's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from skiptree.compiler.ir.graph import ModelIR, TensorSpec, build_block_view
from skiptree.compiler.ir.pass_manager import Pass, PassResult
from skiptree.compiler.ir.trace import STEP_INPUTS, example_caches, example_step_inputs, export_with_caches
from skiptree.models.base import CausalLM
from skiptree.models.feature_head import FeatureHead, load_feature_head
from skiptree.models.shrunk_head import ShrunkHead
from skiptree.runtime.manifest import GraphName


class FeatureDraftModule(nn.Module):
    def __init__(self, model: CausalLM, head: FeatureHead, vocab: torch.Tensor | None = None):
        super().__init__()
        self.model, self.feature_head = model, head
        self.small_head = ShrunkHead(model, vocab) if vocab is not None else None

    def forward(self, features, input_ids, positions, attn_bias, write_slots, *caches):
        k_cache, v_cache = caches  # varargs, like every step graph's caches (export's input structure)
        embedded, context = self.model.embed_step(input_ids, positions)
        predicted = self.feature_head(features, embedded, context, attn_bias, k_cache, v_cache, write_slots)
        normed = self.model.norm(predicted)
        logits = self.model.head(normed) if self.small_head is None else self.small_head(normed)
        return (logits, logits.argmax(-1), predicted, k_cache, v_cache)


@dataclass(frozen=True)
class InsertFeatureHead(Pass):
    """Add "feature_draft" from the trained head at `path`, its output head cut to `vocab` if given.

    Requires: a Llama-family IR and a head trained for it (same hidden size), before InsertTreeVerify.
    Guarantees: the other graphs are untouched; "feature_draft" has the signature above, caches named
    k0/v0 of the target's per-layer cache shape, and T dynamic up to max_seq_len (a whole prompt
    catches up at once); the head is kept in `ir.draft_adapters["feature_draft"]`, whose fuse and
    layers the verify graph applies.
    """

    path: str
    vocab: tuple[int, ...] = ()
    name = "InsertFeatureHead"

    def options(self) -> dict[str, Any]:
        return {"path": self.path, "vocab_size": len(self.vocab)}

    def run(self, ir: ModelIR) -> PassResult:
        head, _ = load_feature_head(Path(self.path), ir.config)
        dtype = next(ir.model.parameters()).dtype
        vocab = torch.tensor(self.vocab, dtype=torch.int64) if self.vocab else None
        head = head.to(dtype)
        ir.draft_adapters[GraphName.FEATURE_DRAFT] = head  # InsertTreeVerify fuses its input features
        module = FeatureDraftModule(ir.model, head, vocab)
        example = example_step_inputs(ir.model, ir.max_seq_len)
        features = torch.zeros(1, 3, ir.config.hidden_size, dtype=dtype)
        dims = ({1: "T"}, {1: "T"}, {2: "T"}, {0: "T"})
        inputs = [("features", features, {1: "T"}), *zip(STEP_INPUTS, example[:4], dims, strict=True)]
        type_name = str(dtype).removeprefix("torch.")
        outputs = [TensorSpec("logits", type_name, (1, "T", ir.config.vocab_size)),
                   TensorSpec("next_ids", "int64", (1, "T")),
                   TensorSpec("next_features", type_name, (1, "T", ir.config.hidden_size))]  # fmt: skip
        caches = example_caches(ir.model, ir.max_seq_len, [0])
        name = GraphName.FEATURE_DRAFT
        ir.graphs[name] = export_with_caches(name, module, inputs, caches, outputs, ir.max_seq_len, [0])
        ir.blocks = build_block_view(ir.config, ir.graphs)
        return PassResult(ir, True)
