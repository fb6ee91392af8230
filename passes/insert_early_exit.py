"""InsertEarlyExit: a one-token decode graph that stops after an exit layer when confident (CALM).

Lossy by nature: a token emitted at an exit may differ from the full model's. The exit decision is
taken inside the graph (`torch.cond`, lowered to ONNX `If`), so the skipped layers really do not run.

At each exit e (layer indices: after layers 0..e-1), the exit head is the model's own final norm and
output head (untrained: CALM shares the head too); its confidence, by `gate`:
  softmax  max softmax probability
  margin   top-1 minus top-2 softmax probability
  cosine   cosine similarity of the hidden states before and after the last layer (saturation)
is compared with the `threshold` input (calibrated at compile time, see compiler/drafters/exit_calibration.py;
a threshold above 1 never fires: the graph is then the full model).
K/V of the skipped layers (CALM state propagation): layer j >= e caches the K/V its own projections
make from the exit's hidden state, so later tokens attend a full-length cache in every layer.
Inside an `If` branch the cache cannot be updated in place, so a branch that runs layers works on
copies of their caches and returns the new K/V rows, which are written in place after the `If`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from skiptree.compiler.ir.graph import ModelIR, TensorSpec, build_block_view
from skiptree.compiler.ir.pass_manager import Pass, PassResult
from skiptree.compiler.ir.trace import STEP_INPUTS, example_caches, export_with_caches
from skiptree.compiler.specs import EarlyExitSpec
from skiptree.models.base import CausalLM
from skiptree.models.shrunk_head import ShrunkHead
from skiptree.runtime.manifest import GraphName

NEVER = 2.0  # a threshold no gate reaches: the full model


def gate_confidence(
    gate: str, logits: torch.Tensor, hidden: torch.Tensor, previous: torch.Tensor
) -> torch.Tensor:
    """Confidence [...] of an exit from its logits [..., V], hidden state and the one a layer before."""
    if gate == "cosine":
        return nn.functional.cosine_similarity(hidden.float(), previous.float(), dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    if gate == "softmax":
        return probs.amax(-1)
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


class ExitStepModule(nn.Module):
    """exit_step(input_ids, positions, attn_bias, write_slots, threshold, *caches)
    -> (logits [1, 1, V], next_ids [1, 1], layers_run [1], *caches): one token, exits by the gate."""

    def __init__(self, model: CausalLM, exits: tuple[int, ...], gate: str, vocab: torch.Tensor | None = None):
        super().__init__()
        self.model, self.exits, self.gate = model, exits, gate
        self.num_layers = model.config.num_layers
        self.small_head = ShrunkHead(model, vocab) if vocab is not None else None

    def exit_logits(self, x: torch.Tensor) -> torch.Tensor:
        """An exit head: the model's norm and head, or its head cut to the kept tokens."""
        return self.model.finish(x) if self.small_head is None else self.small_head(self.model.norm(x))

    def forward(self, input_ids, positions, attn_bias, write_slots, threshold, *caches):
        count = self.num_layers
        k_cache, v_cache = caches[:count], caches[count:]
        x, context = self.model.embed_step(input_ids, positions)
        first = self.exits[0]
        previous = x
        for layer in range(first):  # before the first exit: always run, in place
            previous = x
            x = self.model.run_layer(
                layer, x, context, attn_bias, k_cache[layer], v_cache[layer], write_slots
            )
        step = (context, attn_bias, write_slots, threshold)
        logits, k_rows, v_rows, layers_run = self._decide(
            0, x, previous, step, k_cache[first:], v_cache[first:]
        )
        index = (torch.arange(1).view(1, 1, 1), torch.arange(k_cache[0].shape[1]).view(1, -1, 1),
                 write_slots.view(1, 1, 1))  # fmt: skip
        for j, layer in enumerate(range(first, count)):
            k_cache[layer].index_put_(index, k_rows[j])
            v_cache[layer].index_put_(index, v_rows[j])
        return (logits, logits.argmax(-1), layers_run, *caches)

    def _decide(self, i: int, x, previous, step, k_rest, v_rest):
        """At exit i: (logits, K rows, V rows of layers exits[i].., layers run) by the gate."""
        context, attn_bias, write_slots, threshold = step
        start = self.exits[i]
        stop = self.exits[i + 1] if i + 1 < len(self.exits) else self.num_layers
        exit_logits = self.exit_logits(x)
        confident = gate_confidence(self.gate, exit_logits, x, previous).reshape(-1)[0] >= threshold[0]

        def exit_here(x, previous, *rest):
            rows = [self.model.layer_kv(layer, x, context) for layer in range(start, self.num_layers)]
            return (exit_logits.clone(), torch.stack([k for k, _ in rows]), torch.stack([v for _, v in rows]),
                    torch.full((1,), start, dtype=torch.int64))  # fmt: skip

        def go_on(x, previous, *rest):
            count = len(rest) // 2
            k_copy, v_copy = [c.clone() for c in rest[:count]], [c.clone() for c in rest[count:]]
            for j, layer in enumerate(range(start, stop)):
                previous = x
                x = self.model.run_layer(layer, x, context, attn_bias, k_copy[j], v_copy[j], write_slots)
            ran = stop - start
            k_rows = [c.index_select(2, write_slots) for c in k_copy[:ran]]
            v_rows = [c.index_select(2, write_slots) for c in v_copy[:ran]]
            if stop == self.num_layers:
                return (self.model.finish(x), torch.stack(k_rows), torch.stack(v_rows),
                        torch.full((1,), stop, dtype=torch.int64))  # fmt: skip
            logits, k_more, v_more, layers_run = self._decide(
                i + 1, x, previous, step, k_copy[ran:], v_copy[ran:]
            )
            return (
                logits,
                torch.cat([torch.stack(k_rows), k_more]),
                torch.cat([torch.stack(v_rows), v_more]),
                layers_run,
            )

        return torch.cond(confident, exit_here, go_on, (x, previous, *k_rest, *v_rest))


@dataclass(frozen=True)
class InsertEarlyExit(Pass):
    """Add the "exit_step" graph: one-token decode with exits after `spec.exits` gated by `spec.gate`.

    Requires: the IR of a model with the layer API of `CausalLM`. Guarantees: the "step" graph is
    untouched (prefill runs it); "exit_step" shares its cache layout and takes a `threshold [1]`;
    with a threshold above 1 it computes exactly the full model.
    """

    spec: EarlyExitSpec
    vocab: tuple[int, ...] = ()  # the exit heads' tokens when spec.vocab > 0
    name = "InsertEarlyExit"

    def options(self) -> dict:
        return {"spec": self.spec.__dict__, "vocab_size": len(self.vocab)}

    def run(self, ir: ModelIR) -> PassResult:
        model, max_len = ir.model, ir.max_seq_len
        spec = self.spec.resolved(ir.config.num_layers)
        caches = example_caches(model, max_len)
        dtype = caches[0].dtype
        inputs = [(STEP_INPUTS[0], torch.zeros(1, 1, dtype=torch.int64), {}),
                  (STEP_INPUTS[1], torch.zeros(1, 1, dtype=torch.int64), {}),
                  (STEP_INPUTS[2], torch.zeros(1, 1, 1, max_len, dtype=dtype), {}),
                  (STEP_INPUTS[3], torch.zeros(1, dtype=torch.int64), {}),
                  ("threshold", torch.full((1,), NEVER, dtype=torch.float32), {})]  # fmt: skip
        name = str(dtype).removeprefix("torch.")
        outputs = [TensorSpec("logits", name, (1, 1, ir.config.vocab_size)),
                   TensorSpec("next_ids", "int64", (1, 1)),
                   TensorSpec("layers_run", "int64", (1,))]  # fmt: skip
        vocab = torch.tensor(self.vocab, dtype=torch.int64) if self.vocab else None
        module = ExitStepModule(model, spec.exits, spec.gate, vocab)
        name = GraphName.EXIT_STEP
        ir.graphs[name] = export_with_caches(name, module, inputs, caches, outputs, 1)
        ir.blocks = build_block_view(ir.config, ir.graphs)
        return PassResult(ir, True)
