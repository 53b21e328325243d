"""Which metrics Lightning's validation loop logs and which arrive later from the evaluator.

`eval/loss` is computed in the training process at each validation, so it is in
`trainer.callback_metrics` when `on_validation_end` runs. The evaluator's figures
(`eval/accuracy`, ...) describe the same checkpoint but arrive seconds to minutes later, while
training goes on. A callback that acts on the objective must know which kind it has: the first
is read at validation end, the second when the checkpoint's result comes back.
"""

from __future__ import annotations

import math

VALIDATION_METRICS = ("eval/loss",)
"""Logged by the validation loop itself (SFTModule), at every evaluation."""
EVALUATOR_FIGURES = ("accuracy", "format_accuracy", "correct", "wrong_answer", "format_failure", "mean_response_length")
"""Figures of an evaluator result, logged as `eval/<figure>`."""


def evaluator_figure(metric: str) -> str | None:
    """The result key of an evaluator metric (`eval/accuracy` -> `accuracy`), None for others."""
    if not metric.startswith("eval/"):
        return None
    name = metric.removeprefix("eval/")
    return name if name in EVALUATOR_FIGURES else None


def is_late(metric: str) -> bool:
    """Whether `metric` comes from the evaluator, after the validation that posted its checkpoint."""
    return evaluator_figure(metric) is not None


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (any finite value beats none)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
