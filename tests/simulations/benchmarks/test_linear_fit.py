"""The scaling benchmarks' linear fit says linear when the data are linear, and not otherwise."""

from __future__ import annotations

import pytest

from simulations.benchmarks.bench_coordinator import linear_fit


def test_exactly_linear_round_times_fit_with_r2_one() -> None:
    fit = linear_fit([10, 25, 50], [3.0 + 0.4 * n for n in (10, 25, 50)])
    assert fit["slope_s_per_site"] == pytest.approx(0.4)
    assert fit["intercept_s"] == pytest.approx(3.0)
    assert fit["r2"] == pytest.approx(1.0)


def test_quadratic_round_times_do_not_look_linear() -> None:
    sizes = [10, 20, 30, 40, 50, 100]
    fit = linear_fit(sizes, [0.01 * n * n for n in sizes])
    assert fit["r2"] < 0.97


def test_a_fit_needs_two_different_sizes() -> None:
    with pytest.raises(ValueError, match="two different"):
        linear_fit([10, 10], [1.0, 2.0])
