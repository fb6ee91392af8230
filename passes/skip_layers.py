"""SkipLayers: a self-draft graph made of some of the target's own layers (self-speculation).

Two kinds, named the way `--draft` takes them:
  self:exit=E       prefix exit (LayerSkip): layers 0..E-1, then the final norm and the head. The
                    K/V it writes for those layers are exactly the target's (same layers, same
                    inputs), so they stay in the cache and verification starts at layer E from the
                    hidden states the draft returns (`InsertTreeVerify(first_layer=E)`).
  self:skip=4-9,15  skip set (Draft&Verify, SWIFT): every layer but the listed ones (indices,
                    inclusive ranges). Layers after a skipped one see a different residual stream,
                    so the K/V it writes are scratch: they land in the draft slots, which the full
                    verification overwrites.
Either way the draft graph reads and writes the target's cache buffers of the layers it runs, and
decoding stays lossless: every emitted token is the full target's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from skiptree.compiler.ir.graph import ModelIR, TensorSpec, build_block_view
from skiptree.compiler.ir.pass_manager import Pass, PassResult
from skiptree.compiler.ir.trace import STEP_INPUTS, example_caches, example_step_inputs, export_with_caches
from skiptree.compiler.specs import SelfDraftSpec
from skiptree.models.base import CausalLM
from skiptree.models.exit_adapter import load_adapter
from skiptree.models.shrunk_head import ShrunkHead
from skiptree.runtime.manifest import GraphName


class LayerSubsetModule(nn.Module):
    """draft(input_ids, positions, attn_bias, write_slots, *caches of `layers`)
    -> (logits, next_ids, hidden, *caches): the step contract over some layers only; `hidden` is
    the residual stream after the last of them (before the final norm).

    With `vocab` (token ids, ShrinkDraftVocab) the head computes only those rows (`ShrunkHead`).
    """

    def __init__(self, model: CausalLM, layers: list[int], vocab: torch.Tensor | None = None,
                 adapter: nn.Module | None = None):  # fmt: skip
        super().__init__()
        self.model, self.layers, self.adapter = model, layers, adapter
        self.small_head = ShrunkHead(model, vocab) if vocab is not None else None

    def forward(self, input_ids, positions, attn_bias, write_slots, *caches):
        count = len(self.layers)
        x, context = self.model.embed_step(input_ids, positions)
        for j, layer in enumerate(self.layers):
            x = self.model.run_layer(layer, x, context, attn_bias, caches[j], caches[count + j], write_slots)
        out = x if self.adapter is None else self.adapter(x)  # `hidden` stays the layers' own state
        logits = self.model.finish(out) if self.small_head is None else self.small_head(self.model.norm(out))
        return (logits, logits.argmax(-1), x, *caches)


@dataclass(frozen=True)
class SkipLayers(Pass):
    """Add the "self_draft" graph: the target's step restricted to `spec`'s layers.

    Requires: the IR of a model (any family with the layer API of `CausalLM`). Guarantees: the
    other graphs are untouched; "self_draft" has the step graph's inputs and caches named k{i}/v{i}
    by the target's layer indices (so the runtime binds the target's own buffers), and outputs
    `logits`, `next_ids` and `hidden [1, T, H]`.
    """

    spec: SelfDraftSpec
    adapter: str | None = None  # a trained exit adapter (safetensors) between the layers and the head
    name = "SkipLayers"

    def run(self, ir: ModelIR) -> PassResult:
        self.spec.check(ir.config.num_layers)
        adapter = None
        if self.adapter:
            adapter = load_adapter(Path(self.adapter))[0].to(next(ir.model.parameters()).dtype)
        export_layer_subset(ir, GraphName.SELF_DRAFT, self.spec.kept(ir.config.num_layers), adapter=adapter)
        return PassResult(ir, True)


def export_layer_subset(ir: ModelIR, name: str, layers: list[int], vocab: torch.Tensor | None = None,
                        adapter: nn.Module | None = None) -> None:  # fmt: skip
    """(Re)place graph `name` of the IR with a `LayerSubsetModule` step over `layers`. Its adapter is
    kept on the IR (`ir.draft_adapters`), so a later pass that rebuilds the graph keeps it."""
    if adapter is not None:
        ir.draft_adapters[name] = adapter
    adapter = ir.draft_adapters.get(name)
    example = example_step_inputs(ir.model, ir.max_seq_len)
    caches = example_caches(ir.model, ir.max_seq_len, layers)
    dims = ({1: "T"}, {1: "T"}, {2: "T"}, {0: "T"})
    inputs = [(name, value, dim) for name, value, dim in zip(STEP_INPUTS, example[:4], dims, strict=True)]
    dtype = str(caches[0].dtype).removeprefix("torch.")
    outputs = [TensorSpec("logits", dtype, (1, "T", ir.config.vocab_size)),
               TensorSpec("next_ids", "int64", (1, "T")),
               TensorSpec("hidden", dtype, (1, "T", ir.config.hidden_size))]  # fmt: skip
    module = LayerSubsetModule(ir.model, layers, vocab, adapter)
    ir.graphs[name] = export_with_caches(name, module, inputs, caches, outputs, ir.max_seq_len, layers)
    ir.blocks = build_block_view(ir.config, ir.graphs)
