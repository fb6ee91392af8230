"""The compile pipeline: which passes run, in which order, as data.

Phases, top to bottom (later issues fill them):
  1. structure   — draft variants and exits cut from the target's blocks (SkipLayers, InsertEarlyExit)
  2. verification — the tree-verify step graph and KV compaction (InsertTreeVerify)
  3. cleanup     — dead ops left by the phases above (EliminateDeadCode)
A pass that is off keeps its place as nothing: the list is built, never branched around.
"""

from __future__ import annotations

from skiptree.compiler.options import CompileOptions
from skiptree.compiler.pass_manager import Pass
from skiptree.passes.eliminate_dead_code import EliminateDeadCode
from skiptree.passes.insert_tree_verify import InsertTreeVerify


def build_pipeline(options: CompileOptions) -> list[Pass]:
    """The passes a compile with these options runs, in order."""
    structure: list[Pass] = []
    verification: list[Pass] = [InsertTreeVerify(max_tree=options.max_tree)] if options.draft else []
    cleanup: list[Pass] = [EliminateDeadCode()]
    return [*structure, *verification, *cleanup]
