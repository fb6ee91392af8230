"""The measured verify cost T(n): a nondecreasing fit of noisy medians."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skiptree.compiler.drafters.verify_cost import nondecreasing


def test_a_noisy_high_reading_is_averaged_with_its_neighbours():
    # the running max turned [1.08, 1.22, 1.20, 1.21] into [1.08, 1.22, 1.22, 1.22]
    assert nondecreasing([1.08, 1.22, 1.20, 1.21]) == pytest.approx([1.08, 1.21, 1.21, 1.21])
    assert nondecreasing([1.0, 1.1, 1.3]) == [1.0, 1.1, 1.3]  # already ordered: unchanged


@given(st.lists(st.floats(0.5, 4.0), max_size=12))
def test_the_fit_is_nondecreasing_and_keeps_the_total(values):
    fitted = nondecreasing(values)
    assert len(fitted) == len(values)
    assert all(a <= b + 1e-12 for a, b in zip(fitted, fitted[1:], strict=False))
    assert sum(fitted) == pytest.approx(sum(values))  # pooling averages: the sum is kept
    # the least-squares nondecreasing fit: at least as close to the data as the running max
    running, best = [], float("-inf")
    for value in values:
        best = max(best, value)
        running.append(best)
    error = sum((f - v) ** 2 for f, v in zip(fitted, values, strict=True))
    assert error <= sum((r - v) ** 2 for r, v in zip(running, values, strict=True)) + 1e-9
