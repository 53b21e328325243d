"""Confidence intervals for accuracies measured on a finite set of graded problems."""

from __future__ import annotations

import math

Z95 = 1.959964
"""Two-sided 95% normal quantile."""


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `correct / n`.

    Wilson rather than the normal approximation because accuracies near 0 or 1 are common here
    (an untrained model, a saturated task): the normal interval collapses to a point at 0/n and
    n/n and spills outside [0, 1] near them; Wilson's stays inside and keeps a width.
    """
    if isinstance(n, bool) or n <= 0:
        raise ValueError(f"an interval needs at least one graded problem, got n={n!r}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, n={n}], got {correct!r}")
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamped: at k=0 or k=n the bound is exactly 0 or 1, which rounding can miss by an ulp.
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_interval(correct: int | None, n: int | None, z: float = Z95) -> tuple[float, float] | None:
    """`wilson_interval`, or None when nothing was graded (an old study, a failed evaluation)."""
    if correct is None or not n or n <= 0 or not 0 <= correct <= n:
        return None
    return wilson_interval(int(correct), int(n), z)


def intervals_overlap(a: tuple[float, float] | list[float] | None, b: tuple[float, float] | list[float] | None) -> bool:
    """Whether two intervals share a point: the accuracies are not told apart at that level."""
    if a is None or b is None:
        return False
    return a[0] <= b[1] and b[0] <= a[1]
