"""lit_sft.stats: the Wilson interval against known values and at its edges."""

from __future__ import annotations

import pytest

from lit_sft.stats import accuracy_interval, intervals_overlap, wilson_interval


def test_wilson_known_value():
    # 60/100 at 95%: [0.5020, 0.6906] (e.g. statsmodels proportion_confint(method="wilson"))
    low, high = wilson_interval(60, 100)
    assert low == pytest.approx(0.50200, abs=1e-4)
    assert high == pytest.approx(0.69061, abs=1e-4)


def test_wilson_edges_stay_inside_and_keep_a_width():
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.16113, abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(1 - 0.16113, abs=1e-4)


def test_wilson_narrows_with_n_and_widens_with_z():
    def width(k, n, **kw):
        lo, hi = wilson_interval(k, n, **kw)
        return hi - lo

    assert width(500, 1000) < width(50, 100) < width(5, 10)
    assert width(50, 100, z=2.575829) > width(50, 100)


@pytest.mark.parametrize("correct, n", [(0, 0), (1, 0), (-1, 10), (11, 10)])
def test_wilson_rejects_impossible_counts(correct, n):
    with pytest.raises(ValueError):
        wilson_interval(correct, n)


def test_accuracy_interval_is_none_without_graded_problems():
    assert accuracy_interval(0, 0) is None
    assert accuracy_interval(None, 100) is None
    assert accuracy_interval(3, None) is None
    assert accuracy_interval(60, 100) == wilson_interval(60, 100)


def test_intervals_overlap():
    assert intervals_overlap((0.5, 0.7), (0.69, 0.8))
    assert not intervals_overlap((0.5, 0.7), (0.71, 0.8))
    assert intervals_overlap([0.2, 0.9], (0.4, 0.5))
    assert not intervals_overlap(None, (0.4, 0.5))
