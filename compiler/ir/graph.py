"""The skiptree IR: exported step graphs (FX, ATen ops) plus a block view (networkx).

Node vocabulary
---------------
Op level — each `StepGraph.program` is a `torch.export.ExportedProgram`; its FX nodes are
  `placeholder` (parameters, buffers, then the user inputs of the signature), `call_function`
  (one ATen op, `node.target` e.g. `aten.linear.default`), `get_attr`, and one `output`.
  `node.meta["nn_module_stack"]` says which module made the op; `node.meta["block"]` (set by
  `build_block_view`) says which block owns it.
Block level — `ModelIR.blocks` is a `networkx.DiGraph` whose nodes are named blocks with
  attributes `kind` (one of BLOCK_KINDS), `ops` (FX node names), `weights` (parameter names)
  and, for layer parts, `layer` (index). Edges follow the data flow of the residual stream:
  embed -> layers.0 -> ... -> layers.{L-1} -> norm -> head; a layer block has `part` edges to
  its `attn` and `mlp` blocks. Ops outside every layer (rotary tables, position math) belong
  to the `glue` block.

Structural passes edit the block view (and re-trace); op-level passes edit the FX graph.
`verify_ir` checks the invariants after every pass (always in tests, on `--verify` in the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from skiptree.models.base import CausalLM
from skiptree.models.config import ModelConfig

DRAFT_HEAD_PARTS = ("small_head", "adapter", "feature_head")  # draft-only modules, in the head block
BLOCK_KINDS = ("glue", "embed", "layer", "attention", "mlp", "norm", "head")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a step graph: name, dtype, shape (ints or symbolic dim names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class StepGraph:
    """One traced entry point (e.g. "step": T tokens in, logits out, caches updated in place)."""

    name: str
    program: torch.export.ExportedProgram
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    mutated_inputs: dict[str, str] = field(default_factory=dict)  # output name -> input updated

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph

    def signature_json(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "in_place": self.mutated_inputs,
        }


@dataclass(frozen=True)
class PassRecord:
    """A pass that ran: its name, its options, and whether it changed the IR."""

    name: str
    options: dict[str, Any]
    modified: bool


@dataclass
class ModelIR:
    """Everything the compiler knows about one model being compiled."""

    config: ModelConfig
    model: CausalLM
    max_seq_len: int
    graphs: dict[str, StepGraph]
    blocks: nx.DiGraph
    passes_run: list[PassRecord] = field(default_factory=list)
    draft_adapters: dict[str, Any] = field(default_factory=dict)  # graph name -> trained draft module
    weight_quantization: dict[str, Any] = field(default_factory=dict)  # graph -> WeightQuantization
    weight_grid: dict[str, Any] = field(default_factory=dict)  # a GGUF source's grids (models/gguf_grid.py)


class IRError(Exception):
    """An IR invariant broken by a pass: names the node, the pass, and what to fix."""


def block_of(node: torch.fx.Node) -> str:
    """The block an op belongs to, from the innermost module that made it."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    for path in reversed(paths):
        parts = [p for p in path.replace("L['self']", "").replace("L__self__", "").split(".") if p]
        parts = [p for p in parts if p != "model"]  # the step wrapper's attribute
        if len(parts) >= 2 and parts[0] == "layers":
            part = parts[2] if len(parts) > 2 else None
            sub = {"attn": "attn", "attn_norm": "attn", "mlp": "mlp", "mlp_norm": "mlp"}
            sub.update({"fc": "mlp", "proj": "mlp"})  # GPT-2 keeps its MLP linears in the layer
            if part in sub:
                return f"layers.{parts[1]}.{sub[part]}"
            return f"layers.{parts[1]}"
        if parts and parts[0] in ("embed", "position_embed"):
            return "embed"
        if parts and parts[0] in DRAFT_HEAD_PARTS:  # a draft's shrunk head, adapter, feature head
            return "head"
        if parts and parts[0] in ("norm", "head"):
            return parts[0]
    return "glue"


def build_block_view(config: ModelConfig, graphs: dict[str, StepGraph]) -> nx.DiGraph:
    """The block graph of a decoder, with each op of each step graph assigned to its block."""
    blocks = nx.DiGraph()
    blocks.add_node("glue", kind="glue", ops=[], weights=[])
    chain = ["embed"] + [f"layers.{i}" for i in range(config.num_layers)] + ["norm", "head"]
    for name in chain:
        kind = "layer" if name.startswith("layers.") else name
        blocks.add_node(name, kind=kind, ops=[], weights=[])
        if kind == "layer":
            layer = int(name.split(".")[1])
            blocks.nodes[name]["layer"] = layer
            for part, part_kind in (("attn", "attention"), ("mlp", "mlp")):
                blocks.add_node(f"{name}.{part}", kind=part_kind, ops=[], weights=[], layer=layer)
                blocks.add_edge(name, f"{name}.{part}", relation="part")
    for src, dst in zip(chain, chain[1:], strict=False):
        blocks.add_edge(src, dst, relation="flow")
    for graph_name, step in graphs.items():
        params = step.program.graph_signature.inputs_to_parameters
        for node in step.graph.nodes:
            if node.op == "call_function":
                node.meta["block"] = block_of(node)
                blocks.nodes[node.meta["block"]]["ops"].append(f"{graph_name}:{node.name}")
            elif node.op == "placeholder" and node.name in params:
                weight = params[node.name].removeprefix("model.")
                owner = _weight_block(weight)
                if weight not in blocks.nodes[owner]["weights"]:
                    blocks.nodes[owner]["weights"].append(weight)
    return blocks


def _weight_block(weight: str) -> str:
    parts = weight.split(".")
    if parts[0] == "layers":
        if parts[2] in ("attn", "attn_norm"):
            return f"layers.{parts[1]}.attn"
        if parts[2] in ("mlp", "mlp_norm", "fc", "proj"):
            return f"layers.{parts[1]}.mlp"
        return f"layers.{parts[1]}"
    return {"position_embed": "embed", **dict.fromkeys(DRAFT_HEAD_PARTS, "head")}.get(parts[0], parts[0])


def verify_ir(ir: ModelIR, after_pass: str = "trace") -> None:
    """Check the IR invariants; raise `IRError` naming the node, the pass and the fix."""
    def fail(what: str, fix: str) -> None:
        raise IRError(f"after pass {after_pass}: {what}; {fix}")

    for name, step in ir.graphs.items():
        try:
            step.graph.lint()
        except Exception as exc:
            fail(f"graph '{name}' is malformed ({exc})", "the pass must keep the FX graph well-formed")
        user_inputs = step.program.graph_signature.user_inputs
        if len(step.inputs) != len(user_inputs):  # positional: export names varargs caches_0...
            fail(f"graph '{name}' has {len(user_inputs)} inputs, its signature {len(step.inputs)}",
                 "update StepGraph.inputs when a pass adds or removes an input")  # fmt: skip
        for node in step.graph.nodes:
            if node.op == "call_function" and node.meta.get("block") not in ir.blocks:
                fail(f"op {node.format_node()} in graph '{name}' has no block",
                     "set node.meta['block'] to a block of the block view")  # fmt: skip
    flow = ir.blocks.edge_subgraph(
        [(a, b) for a, b, rel in ir.blocks.edges(data="relation") if rel == "flow"]
    )
    if not nx.is_directed_acyclic_graph(ir.blocks):
        fail("the block view has a cycle", "blocks must form a DAG in data-flow order")
    sources = [n for n in flow.nodes if flow.in_degree(n) == 0]
    sinks = [n for n in flow.nodes if flow.out_degree(n) == 0]
    if sources != ["embed"] or sinks != ["head"]:
        fail(f"the residual flow runs from {sources} to {sinks}, not from embed to head",
             "keep one flow path from embed to head")  # fmt: skip
    for block, data in ir.blocks.nodes(data=True):
        if data.get("kind") not in BLOCK_KINDS:
            fail(f"block {block} has kind {data.get('kind')!r}", f"use one of {BLOCK_KINDS}")
    owners: dict[str, str] = {}
    for block, weights in ir.blocks.nodes(data="weights"):
        for weight in weights:
            if weight in owners:
                fail(f"weight {weight} is owned by both {owners[weight]} and {block}",
                     "a weight belongs to exactly one block")  # fmt: skip
            owners[weight] = block
