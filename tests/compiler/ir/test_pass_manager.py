"""The pass manager runs a pipeline in order, records it, verifies and dumps after each pass."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import transformers
from conftest import TINY_LLAMA, write_tiny_model

from skiptree.compiler.ir.graph import IRError, ModelIR
from skiptree.compiler.ir.pass_manager import Pass, PassManager, PassResult
from skiptree.compiler.ir.trace import trace_model
from skiptree.compiler.options import CompileOptions
from skiptree.compiler.pipeline import build_pipeline
from skiptree.models.loader import load_model
from skiptree.passes.eliminate_dead_code import EliminateDeadCode


@dataclass(frozen=True)
class DropBlock(Pass):
    """Breaks the IR on purpose: removes a block that ops still point to."""

    block: str = "norm"
    name = "DropBlock"

    def run(self, ir: ModelIR) -> PassResult:
        ir.blocks.remove_node(self.block)
        return PassResult(ir, True)


@pytest.fixture
def tiny_ir(tmp_path):
    write_tiny_model(tmp_path / "m", transformers.LlamaConfig(**TINY_LLAMA))
    return trace_model(load_model(tmp_path / "m"), max_seq_len=16)


def test_records_passes_and_dumps_after_each(tiny_ir, tmp_path):
    messages = []
    manager = PassManager([EliminateDeadCode()], verify=True, dump_dir=tmp_path / "ir", log=messages.append)
    ir = manager.run(tiny_ir)
    assert [(r.name, r.options, r.modified) for r in ir.passes_run] == [("EliminateDeadCode", {}, False)]
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["00-trace", "01-EliminateDeadCode"]
    assert messages[0].startswith("  pass 1/1 EliminateDeadCode: unchanged (")


def test_verifier_stops_a_broken_pass_and_names_it(tiny_ir):
    manager = PassManager([DropBlock()], verify=True, log=lambda message: None)
    with pytest.raises(IRError, match=r"after pass DropBlock: op %\w+ : .* in graph 'step' has no block"):
        manager.run(tiny_ir)


def test_default_pipeline_is_data():
    plain = build_pipeline(CompileOptions())  # ORT: a fused verify graph where the model fuses
    assert [type(p).__name__ for p in plain] == ["InsertTreeVerify", "EliminateDeadCode"]
    assert plain[0].plain_decoding and plain[0].fused_attention
    tvm = build_pipeline(CompileOptions(backend="tvm"))
    assert [type(p).__name__ for p in tvm] == ["EliminateDeadCode"]
