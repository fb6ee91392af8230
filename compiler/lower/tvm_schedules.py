"""Hand-written CPU schedules for the matmuls of a decode or verify step (a few rows of activations).

A step with T tokens multiplies [T, K] activations by every [N, K] weight: matrix-vector products
bounded by memory bandwidth, where all that matters is to stream each weight row once, in SIMD
vectors, with independent accumulators. dlight's CPU GEMV rule vectorises across output rows
instead (strided loads: ~4 GB/s measured here) and MetaSchedule tunes with the weights hot in cache,
which rewards schedules that are slow when the weights come from memory, as they do in a step.

- `matmul_transposed_b` (out[.., i, n] = sum_k A[.., i, k] * B[.., n, k]: every weight matmul and
  attention scores against the K cache): each group of `rows` B rows is read once, in `lanes`-wide
  vectors of k into a register tile (rfactor), for every row i of A in turn (the B rows stay in L1).
- `matmul_plain_b` (out[.., i, n] = sum_k A[.., i, k] * B[.., k, n]: attention weights times the V
  cache): B rows are contiguous in n, so n is vectorised and accumulated in registers.

Measured on this 2-core machine, 1 thread, weights cold: 13.6-15.3 GB/s for SmolLM2's weight
shapes at T = 1 (ONNX Runtime's whole decode step runs at ~14 GB/s), against ~4 GB/s for dlight.
A dynamic row count (the token count of the untuned `main` entry: prefill) gets the same schedules.
Functions that are not such a matmul, or have more than `MAX_ROWS` static rows, are left to
MetaSchedule (and otherwise to TVM's default loops).
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

MAX_ROWS = 64  # rows of A (tokens x query heads of a group) up to which a matmul is a "step" matmul
LANES = 16  # float32 lanes of an AVX-512 vector
IS_SCHEDULED = "tirx.is_scheduled"


def _divisor(extent: int, choices: tuple[int, ...]) -> int:
    return next(choice for choice in choices if extent % choice == 0)


def _static(extents: list) -> list[int] | None:
    return [int(e) for e in extents] if all(isinstance(e, tirx.IntImm) for e in extents) else None


def matmul_kind(block: tirx.SBlock) -> str | None:
    """'transposed_b' or 'plain_b' for a reduction block out[.., i, n] += A[.., i, k] * B[..],
    where B is indexed [.., n, k] or [.., k, n]; None for anything else."""
    kinds = [int(iv.iter_type) for iv in block.iter_vars]
    spatial = all(kind == tirx.IterVar.DataPar for kind in kinds[:-1])
    if len(kinds) < 3 or kinds[-1] != tirx.IterVar.CommReduce or not spatial:
        return None
    if len(block.reads) != 2 or len(block.writes) != 1:
        return None
    *batch, i, n, k = [iv.var for iv in block.iter_vars]

    def indices(region: tirx.BufferRegion) -> list:
        return [r.min for r in region.region]

    a, b = (indices(region) for region in block.reads)
    if not (len(a) >= 2 and a[-1].same_as(k)):  # the operands in the other order
        a, b = b, a
    out = indices(block.writes[0])
    same = all(x.same_as(y) for x, y in zip(out, [*batch, i, n], strict=False)) and len(out) == len(batch) + 2
    if not same or len(a) < 2 or not (a[-1].same_as(k) and a[-2].same_as(i)):
        return None
    if len(b) >= 2 and b[-1].same_as(k) and b[-2].same_as(n):
        return "transposed_b"
    if len(b) >= 2 and b[-1].same_as(n) and b[-2].same_as(k):
        return "plain_b"
    return None


def schedule_transposed_b(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """Stream B rows in groups of `rows`, k in vectors, for each row of A (see the module doc)."""
    *batch, i, n, k = sch.get_loops(block)
    extent_n, extent_k = int(sch.get(n).extent), int(sch.get(k).extent)
    lanes, rows = _divisor(extent_k, (LANES, 8, 4, 2, 1)), _divisor(extent_n, (4, 2, 1))
    k_outer, k_inner = sch.split(k, [None, lanes])
    partial = sch.rfactor(k_inner, 0)  # partial sums [lanes, ..]: one vector per output
    *batch, i, n, k_outer, k_inner = sch.get_loops(partial)
    n_outer, n_inner = sch.split(n, [None, rows])
    sch.reorder(*batch, n_outer, i, k_outer, n_inner, k_inner)
    sch.vectorize(k_inner)
    sch.unroll(n_inner)
    sch.decompose_reduction(partial, k_outer)
    sch.set_scope(partial, 0, "local")
    sch.reverse_compute_at(block, i)  # sum the lanes of a tile right after it is complete


def schedule_plain_b(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV) -> None:
    """Vectorise n (contiguous in B and the output) with a register accumulator per row of A."""
    *batch, i, n, k = sch.get_loops(block)
    width = _divisor(int(sch.get(n).extent), (4 * LANES, 2 * LANES, LANES, 8, 4, 2, 1))
    n_outer, n_inner = sch.split(n, [None, width])
    sch.reorder(*batch, n_outer, i, k, n_inner)
    accumulator = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulator, i)
    vectors, lanes = sch.split(n_inner, [None, min(LANES, width)])
    sch.unroll(vectors)
    if width > 1:  # (TVM refuses to vectorise loops of 1 here)
        sch.vectorize(lanes)
    sch.decompose_reduction(block, k)
    if width > 1:
        sch.vectorize(sch.get_loops(accumulator)[-1])


SCHEDULES = {"transposed_b": schedule_transposed_b, "plain_b": schedule_plain_b}


def schedule_step_matmul(function: tirx.PrimFunc) -> tirx.PrimFunc | None:
    """The function scheduled by one of our rules, or None when it is not a step matmul."""
    if function.attrs is not None and IS_SCHEDULED in function.attrs:
        return None
    sch = s_tir.Schedule(function)
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except s_tir.schedule.ScheduleError:  # no blocks at all (hand-written loops)
        return None
    if len(blocks) != 1:
        return None
    block = sch.get(blocks[0])
    kind = matmul_kind(block)
    extents = [iv.dom.extent for iv in block.iter_vars]
    if kind is None or _static(extents[-2:]) is None:
        return None
    if isinstance(extents[-3], tirx.IntImm) and int(extents[-3]) > MAX_ROWS:
        return None
    SCHEDULES[kind](sch, blocks[0])
    return sch.mod["main"].with_attr(IS_SCHEDULED, True)


@tvm.transform.module_pass(opt_level=0, name="ScheduleStepMatmuls")
def schedule_step_matmuls(module: tvm.IRModule, _context: tvm.transform.PassContext) -> tvm.IRModule:
    """Schedule every step matmul of a legalised module (see `schedule_step_matmul`)."""
    updates = {}
    for global_var, function in module.functions_items():
        if isinstance(function, tirx.PrimFunc):
            scheduled = schedule_step_matmul(function)
            if scheduled is not None:
                updates[global_var] = scheduled
    for global_var, function in updates.items():
        module[global_var] = function
    return module
