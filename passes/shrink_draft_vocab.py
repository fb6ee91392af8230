"""ShrinkDraftVocab: a draft graph whose output head computes only the V most frequent target tokens.

On CPU the output head is a large share of a draft step (SmolLM2-135M: 49152 x 576, ~0.2 of a full
step). Restricting the draft's head to the target's V most frequent tokens (compiler/drafters/vocab.py
counts them on the target's own outputs) cuts that cost by ~vocab/V; a draft can then never
propose the other tokens, which only lowers acceptance. The verifier keeps the full head, so
decoding stays lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from skiptree.compiler.ir.graph import ModelIR
from skiptree.compiler.ir.pass_manager import Pass, PassResult
from skiptree.passes.skip_layers import export_layer_subset
from skiptree.runtime.manifest import GraphName


def graph_layers(ir: ModelIR, name: str) -> list[int]:
    """The layers a step graph runs, from its cache inputs k{i}."""
    names = [spec.name for spec in ir.graphs[name].inputs]
    return [int(n[1:]) for n in names if n[:1] == "k" and n[1:].isdigit()]


@dataclass(frozen=True)
class ShrinkDraftVocab(Pass):
    """Re-export draft graph `graph` ("self_draft", or a draft model's "step") with its head cut to
    `vocab` (token ids, most frequent first).

    Requires: the graph exists and is a step over some layers. Guarantees: same inputs, outputs
    and caches; `next_ids` are token ids in `vocab`; `logits` are full width (min bias elsewhere).
    """

    vocab: tuple[int, ...]
    graph: str = GraphName.SELF_DRAFT
    name = "ShrinkDraftVocab"

    def options(self) -> dict[str, Any]:
        return {"graph": self.graph, "vocab_size": len(self.vocab)}  # the ids go to the manifest once

    def run(self, ir: ModelIR) -> PassResult:
        if self.graph not in ir.graphs:
            return PassResult(ir, False)
        vocab = torch.tensor(self.vocab, dtype=torch.int64)
        export_layer_subset(ir, self.graph, graph_layers(ir, self.graph), vocab)
        return PassResult(ir, True)
