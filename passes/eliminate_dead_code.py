"""EliminateDeadCode: drop ops whose results nobody uses."""

from __future__ import annotations

from dataclasses import dataclass

from skiptree.compiler.ir.graph import ModelIR
from skiptree.compiler.ir.pass_manager import Pass, PassResult


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    """Remove pure ops with no users from every step graph, and from the block view's op lists.

    Requires: well-formed FX graphs. Guarantees: outputs unchanged; ops with side effects stay
    (in-place cache writes such as `index_put_` have no users but are impure, so they stay).
    Structural passes that cut blocks out (layer skipping, early exit) leave dead ops behind:
    this pass runs after them.
    """

    name = "EliminateDeadCode"

    def run(self, ir: ModelIR) -> PassResult:
        modified = False
        for graph_name, step in ir.graphs.items():
            before = {node.name for node in step.graph.nodes}
            if step.graph.eliminate_dead_code():
                modified = True
                step.program.graph_module.recompile()
                removed = {f"{graph_name}:{name}" for name in before - {n.name for n in step.graph.nodes}}
                for _, ops in ir.blocks.nodes(data="ops"):
                    ops[:] = [op for op in ops if op not in removed]
        return PassResult(ir, modified)
