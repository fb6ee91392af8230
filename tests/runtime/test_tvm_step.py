"""The TVM runtime's process-wide settings."""

from __future__ import annotations

import os

import pytest

from skiptree.runtime.tvm_step import set_threads


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two cores")  # fmt: skip
def test_sizing_the_thread_pool_leaves_the_callers_cores():
    """TVM pins the calling thread to one core when it sizes its pool; ORT sessions and peers
    created afterwards in the same process would then share that core (measured: genai int4 at
    2 threads fell from ~115 to ~40 tok/s beside a loaded TVM artifact)."""
    allowed = os.sched_getaffinity(0)
    for threads in (2, 1):
        set_threads(threads)
        assert os.sched_getaffinity(0) == allowed


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two cores")  # fmt: skip
def test_the_thread_pool_has_a_worker_per_core():
    """TVM sizes its pool from half the hardware threads unless told: one worker on two cores."""
    import tvm

    set_threads(2)
    assert tvm.get_global_func("runtime.NumThreads")() == 2
