"""Cache writes in place on TVM: the same values as the functional write, no copy of the cache."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program

from skiptree.compiler.lower.tvm_inplace import in_place_writes, write_caches_in_place


def _write(cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The cache write of `models/base.attend`: all four dims indexed, slots on the third."""
    batch, heads, steps, dim = values.shape
    index = (torch.arange(batch).view(batch, 1, 1, 1), torch.arange(heads).view(1, heads, 1, 1),
             slots.view(1, 1, steps, 1), torch.arange(dim).view(1, 1, 1, dim))  # fmt: skip
    return cache.index_put(index, values)


class WriteThenRead(torch.nn.Module):
    def forward(self, cache, slots, values):
        return _write(cache, slots, values) * 2.0


class ReadOldAfterWrite(torch.nn.Module):
    def forward(self, cache, slots, values):
        return _write(cache, slots, values) + cache  # the old cache is read after the write


def _relax(module: torch.nn.Module, cache: np.ndarray, slots: np.ndarray, values: np.ndarray) -> tvm.IRModule:
    program = torch.export.export(module, tuple(torch.from_numpy(a) for a in (cache, slots, values)))
    return from_exported_program(program)


def _run(ir_module: tvm.IRModule, *arrays: np.ndarray) -> tuple[np.ndarray, list]:
    target = tvm.target.Target({"kind": "llvm"})
    with target:
        executable = tvm.compile(relax.get_pipeline("zero")(ir_module), target)
    machine = relax.VirtualMachine(executable, tvm.cpu())
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    return machine["main"](*tensors)[0].numpy(), tensors


def _inputs():
    rng = np.random.default_rng(0)
    cache = rng.standard_normal((1, 2, 6, 4)).astype("float32")
    return cache, np.array([4, -1, 1], dtype=np.int64), rng.standard_normal((1, 2, 3, 4)).astype("float32")


def test_a_write_into_a_parameter_happens_in_place_with_the_same_result():
    cache, slots, values = _inputs()
    functional = _relax(WriteThenRead(), cache, slots, values)
    rewritten = write_caches_in_place(functional)
    assert "call_tir_inplace" in rewritten["main"].script()
    expected, untouched = _run(functional, cache, slots, values)
    got, tensors = _run(rewritten, cache, slots, values)
    np.testing.assert_array_equal(got, expected)
    written = cache.copy()
    written[:, :, [4, 5, 1]] = values  # slot -1 is the last one, as in torch
    np.testing.assert_array_equal(expected, written * 2)
    np.testing.assert_array_equal(untouched[0].numpy(), cache)  # the functional write copied
    np.testing.assert_array_equal(tensors[0].numpy(), written)  # the in-place write did not


def test_a_parameter_read_after_the_write_keeps_the_functional_copy():
    cache, slots, values = _inputs()
    functional = _relax(ReadOldAfterWrite(), cache, slots, values)
    assert not in_place_writes(functional["main"])
    assert write_caches_in_place(functional) is functional
