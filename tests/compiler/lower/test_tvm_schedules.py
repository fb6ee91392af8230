"""Our step-matmul schedules: which functions they take, and the same numbers as unscheduled loops."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import s_tir, te, tirx

from skiptree.compiler.lower.tvm_schedules import IS_SCHEDULED, MAX_ROWS, matmul_kind, schedule_step_matmul


def transposed_b(batch: tuple[int, ...], rows, n: int, k: int) -> tirx.PrimFunc:
    """out[.., i, n] = sum_k a[.., i, k] * b[.., n, k] (a weight matmul: no batch; scores: batch)."""
    a = te.placeholder((*batch, rows, k), "float32", name="a")
    b = te.placeholder((*batch, n, k), "float32", name="b")
    r = te.reduce_axis((0, k), name="k")
    out = te.compute((*batch, rows, n), lambda *i: te.sum(a[(*i[:-1], r)] * b[(*i[:-2], i[-1], r)], axis=r),
                     name="NT_matmul")  # fmt: skip
    return te.create_prim_func([a, b, out])


def plain_b(batch: int, rows: int, n: int, k: int) -> tirx.PrimFunc:
    a = te.placeholder((batch, rows, k), "float32", name="a")
    b = te.placeholder((batch, k, n), "float32", name="b")
    r = te.reduce_axis((0, k), name="k")
    out = te.compute((batch, rows, n), lambda h, i, j: te.sum(a[h, i, r] * b[h, r, j], axis=r), name="matmul")
    return te.create_prim_func([a, b, out])


def softmax_like(rows: int, n: int) -> tirx.PrimFunc:
    a = te.placeholder((rows, n), "float32", name="a")
    r = te.reduce_axis((0, n), name="k")
    return te.create_prim_func([a, te.compute((rows,), lambda i: te.max(a[i, r], axis=r), name="max")])


def _run(function: tirx.PrimFunc, arrays: list[np.ndarray]) -> np.ndarray:
    target = tvm.target.Target({"kind": "llvm"})
    library = tvm.compile(tvm.IRModule({"main": function.with_attr("global_symbol", "main")}), target)
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    library["main"](*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize("batch, rows, n, k",
                         [((), 1, 96, 64), ((), 5, 97, 24), ((3,), 15, 48, 8), ((), 2, 8, 3)])  # fmt: skip
def test_transposed_b_schedule_computes_the_same_matmul(batch, rows, n, k):
    function = transposed_b(batch, rows, n, k)
    scheduled = schedule_step_matmul(function)
    assert scheduled is not None and scheduled.attrs[IS_SCHEDULED]
    rng = np.random.default_rng(rows)
    a, b = rng.standard_normal((*batch, rows, k), "float32"), rng.standard_normal((*batch, n, k), "float32")
    out = np.zeros((*batch, rows, n), "float32")
    expected = a @ np.swapaxes(b, -1, -2)
    np.testing.assert_allclose(_run(scheduled, [a, b, out]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, rows, n, k", [(3, 3, 64, 512), (2, 5, 24, 7), (1, 1, 3, 5)])
def test_plain_b_schedule_computes_the_same_matmul(batch, rows, n, k):
    function = plain_b(batch, rows, n, k)
    scheduled = schedule_step_matmul(function)
    assert scheduled is not None
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((batch, rows, k), "float32"), rng.standard_normal((batch, k, n), "float32")
    out = np.zeros((batch, rows, n), "float32")
    np.testing.assert_allclose(_run(scheduled, [a, b, out]), a @ b, rtol=1e-4, atol=1e-4)


def test_a_dynamic_token_count_is_scheduled_too():
    tokens = tirx.Var("tokens", "int64")
    scheduled = schedule_step_matmul(transposed_b((), tokens, 32, 16))
    assert scheduled is not None
    rng = np.random.default_rng(1)
    for rows in (1, 7, 130):  # prefill chunks of any length
        a, b = rng.standard_normal((rows, 16), "float32"), rng.standard_normal((32, 16), "float32")
        got = _run(scheduled, [a, b, np.zeros((rows, 32), "float32")])
        np.testing.assert_allclose(got, a @ b.T, rtol=1e-5, atol=1e-5)


def test_other_functions_are_left_alone():
    assert schedule_step_matmul(softmax_like(4, 32)) is None
    schedule = s_tir.Schedule(transposed_b((), 4, 8, 8))
    block = schedule.get(schedule.get_child_blocks(schedule.get_sblock("root"))[0])
    assert matmul_kind(block) == "transposed_b"
    assert schedule_step_matmul(transposed_b((), MAX_ROWS + 1, 8, 8)) is None  # a GEMM: MetaSchedule's
    scheduled = schedule_step_matmul(transposed_b((), 1, 8, 8))
    assert schedule_step_matmul(scheduled) is None  # scheduled once
