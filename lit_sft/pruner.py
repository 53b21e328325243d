"""ASHA with a tie tolerance: Optuna's successive halving, where a near-tie at a rung goes on.

optuna.pruners.SuccessiveHalvingPruner promotes a trial past a rung only if its value is among
the best 1/reduction_factor of the values seen there, and, while fewer than reduction_factor
trials have reached the rung, only if it beats every one of them. Early in a study that makes
the second trial at a rung lose to the first over any difference at all. Measured on the
embedded task (docs/BENCHMARKS.md), two trials 0.6% apart at the first rung, closer than two
runs of one configuration on the CPU differ, decided that random search's eventual best trial
was pruned.

`tolerance` treats values within that fraction of the promotion cutoff as tied with it. At 0
the decisions are exactly Optuna's (tests/test_pruner.py checks them against it, decision by
decision). The rung bookkeeping is Optuna's own (system attrs `completed_rung_<k>`), so trials
pruned by either implementation compete on the same rungs.
"""

from __future__ import annotations

import math

import optuna
from optuna.study import StudyDirection


def _rung_key(rung: int) -> str:
    return f"completed_rung_{rung}"


def _current_rung(trial: optuna.trial.FrozenTrial) -> int:
    rung = 0
    while _rung_key(rung) in trial.system_attrs:
        rung += 1
    return rung


def promotable(value: float, competing: list[float], reduction_factor: int, direction: StudyDirection, tolerance: float) -> bool:
    """Whether `value` (one of `competing`) goes past the rung: within `tolerance` of the
    best-1/reduction_factor cutoff (of the best value while fewer trials competed)."""
    top = max(len(competing) // reduction_factor, 1)
    ranked = sorted(competing, reverse=direction == StudyDirection.MAXIMIZE)
    cutoff = ranked[top - 1]
    slack = tolerance * abs(cutoff)
    if direction == StudyDirection.MAXIMIZE:
        return value >= cutoff - slack
    return value <= cutoff + slack


class TolerantSuccessiveHalvingPruner(optuna.pruners.SuccessiveHalvingPruner):
    """optuna.pruners.SuccessiveHalvingPruner (asynchronous successive halving) plus `tolerance`.

    Args:
        min_resource: Steps (here: examples seen) at the first rung.
        reduction_factor: Rung k sits at min_resource x reduction_factor^(k + min_early_stopping_rate).
        min_early_stopping_rate: Rungs skipped before the first decision.
        tolerance: A value within this fraction of the rung's cutoff counts as tied with it.
    """

    def __init__(self, min_resource: int, reduction_factor: int = 3, min_early_stopping_rate: int = 0, tolerance: float = 0.0) -> None:
        if isinstance(min_resource, bool) or not isinstance(min_resource, int) or min_resource < 1:
            raise ValueError(f"min_resource must be a positive integer, got {min_resource!r}")
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
        super().__init__(min_resource=min_resource, reduction_factor=reduction_factor, min_early_stopping_rate=min_early_stopping_rate)
        self.min_resource = min_resource
        self.reduction_factor = reduction_factor
        self.min_early_stopping_rate = min_early_stopping_rate
        self.tolerance = tolerance

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        rung = _current_rung(trial)
        value = trial.intermediate_values[step]
        trials: list[optuna.trial.FrozenTrial] | None = None
        while step >= self.min_resource * self.reduction_factor ** (self.min_early_stopping_rate + rung):
            if math.isnan(value):
                return True
            if trials is None:
                trials = study.get_trials(deepcopy=False)
            key = _rung_key(rung)
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
            competing = [t.system_attrs[key] for t in trials if key in t.system_attrs] + [value]
            if not promotable(value, competing, self.reduction_factor, study.direction, self.tolerance):
                return True
            rung += 1
        return False
