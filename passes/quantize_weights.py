"""QuantizeWeights: mark a compile's graphs for weight-only int8 / int4 quantisation.

Requires: traced step graphs. Guarantees: every graph of `role` ("target": the step, verify and
early-exit graphs; "draft": the self-draft and feature-head graphs, or a draft model's step) that
has linear layers carries this spec in `ir.weight_quantization`; graphs are otherwise unchanged.
The ONNX lowering then replaces each of those graphs' constant-weight MatMuls by ONNX Runtime's
`MatMulNBits` (`compiler/lower/quantize.py`, ORT's own quantizer). The weights are quantised at lowering
because ORT's quantizer works on ONNX, and because the same grid must reach the runtime as is.
Drafts may be quantised harder than the target (int4 draft, int8 target): verification runs the
target's graph, so decoding stays lossless with respect to the quantised target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skiptree.compiler.ir.graph import ModelIR
from skiptree.compiler.ir.pass_manager import Pass, PassResult
from skiptree.compiler.specs import WeightQuantization
from skiptree.runtime.manifest import GraphName

DRAFT_GRAPHS = (GraphName.SELF_DRAFT, GraphName.FEATURE_DRAFT)
ROLES = ("target", "draft")


def graphs_of_role(ir: ModelIR, role: str) -> list[str]:
    """The graphs a role names (a draft model's own IR has only "step": call it with role "target")."""
    drafts = [name for name in ir.graphs if name in DRAFT_GRAPHS]
    return drafts if role == "draft" else [name for name in ir.graphs if name not in DRAFT_GRAPHS]


def linear_layers(ir: ModelIR, graph: str) -> int:
    """How many matrix products of a parameter the graph has (what the quantizer will find)."""
    program = ir.graphs[graph].program
    parameters = set(program.graph_signature.inputs_to_parameters)
    products = (torch.ops.aten.linear.default, torch.ops.aten.matmul.default, torch.ops.aten.mm.default)
    return sum(1 for node in program.graph.nodes if node.op == "call_function" and node.target in products
               and any(getattr(arg, "name", None) in parameters for arg in node.args[:2]))  # fmt: skip


@dataclass(frozen=True)
class QuantizeWeights(Pass):
    name = "QuantizeWeights"

    bits: int
    block_size: int = 32
    head: bool = True
    accuracy_level: int = 4
    role: str = "target"
    symmetric: bool = True
    grid: bool = False

    @classmethod
    def of(cls, spec: WeightQuantization, role: str = "target") -> QuantizeWeights:
        return cls(spec.bits, spec.block_size, spec.head, spec.accuracy_level, role, spec.symmetric,
                   spec.grid)  # fmt: skip

    @property
    def spec(self) -> WeightQuantization:
        return WeightQuantization(self.bits, self.block_size, self.head, self.accuracy_level, self.symmetric,
                                  self.grid)  # fmt: skip

    def run(self, ir: ModelIR) -> PassResult:
        if self.role not in ROLES:
            raise ValueError(f"QuantizeWeights role {self.role!r} is not one of {ROLES}")
        marked = False
        for graph in graphs_of_role(ir, self.role):
            if linear_layers(ir, graph):
                ir.weight_quantization[graph] = self.spec
                marked = True
        return PassResult(ir, marked)
