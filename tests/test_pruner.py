"""The tolerant ASHA pruner: Optuna's decisions at tolerance 0, near-ties promoted above it."""

from __future__ import annotations

import random

import optuna
import pytest
from optuna.study import StudyDirection
from optuna.trial import TrialState

from lit_sft.pruner import TolerantSuccessiveHalvingPruner, promotable

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _decisions(pruner: optuna.pruners.BasePruner, seed: int, direction: str, n_trials: int = 40) -> list[tuple[int, int, bool]]:
    """Run trials with random decreasing curves, three at a time in random interleaving, and
    record every (trial, step, should_prune) decision."""
    rng = random.Random(seed)
    study = optuna.create_study(direction=direction, pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    curves = [[(step, rng.uniform(0.5, 2.0) / (1 + step / rng.uniform(50, 400))) for step in range(50, 1001, 50)] for _ in range(n_trials)]
    if direction == "maximize":
        curves = [[(s, -v) for s, v in c] for c in curves]
    pending = list(range(n_trials))
    running: dict[int, tuple[optuna.Trial, int]] = {}
    out = []
    while pending or running:
        while pending and len(running) < 3:
            running[pending.pop(0)] = (study.ask(), 0)
        number = rng.choice(sorted(running))
        trial, i = running[number]
        step, value = curves[number][i]
        trial.report(value, step)
        prune = trial.should_prune()
        out.append((number, step, prune))
        if prune or i + 1 == len(curves[number]):
            study.tell(trial, state=TrialState.PRUNED if prune else None, values=None if prune else value)
            del running[number]
        else:
            running[number] = (trial, i + 1)
    return out


@pytest.mark.parametrize("direction", ["minimize", "maximize"])
@pytest.mark.parametrize(("min_resource", "reduction_factor", "rate"), [(100, 3, 0), (50, 2, 0), (100, 4, 1)])
def test_tolerance_zero_decides_exactly_as_optuna(direction: str, min_resource: int, reduction_factor: int, rate: int) -> None:
    for seed in range(3):
        ours = _decisions(TolerantSuccessiveHalvingPruner(min_resource, reduction_factor, rate, tolerance=0.0), seed, direction)
        theirs = _decisions(optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=reduction_factor,
                                                                   min_early_stopping_rate=rate), seed, direction)
        assert ours == theirs
        assert any(prune for *_, prune in ours) and not all(prune for *_, prune in ours)


def test_tolerance_promotes_near_ties_only() -> None:
    minimize, maximize = StudyDirection.MINIMIZE, StudyDirection.MAXIMIZE
    # Second trial at a rung: must beat the first, unless within the tolerance of it.
    assert not promotable(0.7555, [0.752, 0.7555], 3, minimize, tolerance=0.0)
    assert promotable(0.7555, [0.752, 0.7555], 3, minimize, tolerance=0.05)
    assert not promotable(0.80, [0.752, 0.80], 3, minimize, tolerance=0.05)
    assert promotable(0.96, [1.0, 0.96], 3, maximize, tolerance=0.05)
    assert not promotable(0.90, [1.0, 0.90], 3, maximize, tolerance=0.05)
    # Six values, reduction factor 3: the cutoff is the 2nd best.
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert promotable(2.0, values, 3, minimize, 0.0) and not promotable(3.0, values, 3, minimize, 0.0)
    assert promotable(2.09, values + [2.09], 3, minimize, 0.05) and not promotable(2.2, values + [2.2], 3, minimize, 0.05)


def test_a_near_tie_at_the_first_rung_goes_on() -> None:
    """The case from the embedded study: 0.7555 against 0.752 at the first rung."""
    for tolerance, expect_pruned in ((0.0, True), (0.05, False)):
        study = optuna.create_study(pruner=TolerantSuccessiveHalvingPruner(1024, 3, 0, tolerance=tolerance))
        first = study.ask()
        first.report(0.752, 1024)
        assert not first.should_prune()
        study.tell(first, 0.1)
        second = study.ask()
        second.report(0.7555, 1024)
        assert second.should_prune() is expect_pruned


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        TolerantSuccessiveHalvingPruner(10, tolerance=1.5)
    with pytest.raises(ValueError, match="min_resource"):
        TolerantSuccessiveHalvingPruner(0)
    with pytest.raises(ValueError, match="tolerance"):
        TolerantSuccessiveHalvingPruner(10, tolerance=1.0)
    for bad in (True, 2.5, -3):
        with pytest.raises(ValueError, match="min_resource"):
            TolerantSuccessiveHalvingPruner(bad)
    # Optuna's own checks still run on what it is given.
    with pytest.raises(ValueError, match="reduction_factor"):
        TolerantSuccessiveHalvingPruner(10, reduction_factor=1)
    with pytest.raises(ValueError, match="min_early_stopping_rate"):
        TolerantSuccessiveHalvingPruner(10, min_early_stopping_rate=-1)


def test_defaults_are_the_asha_papers() -> None:
    """eta = 3 (Li et al., 2020; Optuna's own default is 4), no skipped rung, Optuna's decisions."""
    ours = TolerantSuccessiveHalvingPruner(1)
    assert (ours.min_resource, ours.reduction_factor, ours.min_early_stopping_rate, ours.tolerance) == (1, 3, 0, 0.0)


def _rung_attrs(pruner: optuna.pruners.BasePruner, reports: list[tuple[int, float]], competitor: float | None = None) -> tuple[list, bool]:
    study = optuna.create_study(pruner=pruner)
    if competitor is not None:
        other = study.ask()
        other.report(competitor, 100)
        other.should_prune()
        study.tell(other, competitor)
    trial = study.ask()
    prune = False
    for step, value in reports:
        trial.report(value, step)
        prune = trial.should_prune()
    attrs = study._storage.get_trial_system_attrs(trial._trial_id)
    return sorted((k, v) for k, v in attrs.items() if k.startswith("completed_rung_")), prune


def test_one_report_past_several_rungs_records_each_as_optuna_does() -> None:
    """A first report at 1,000 examples (rungs at 100, 300, 900) passes three rungs in one call."""
    ours = _rung_attrs(TolerantSuccessiveHalvingPruner(100, 3), [(1000, 0.5)])
    theirs = _rung_attrs(optuna.pruners.SuccessiveHalvingPruner(min_resource=100, reduction_factor=3), [(1000, 0.5)])
    assert ours == theirs
    assert [k for k, _ in ours[0]] == ["completed_rung_0", "completed_rung_1", "completed_rung_2"]


def test_no_report_is_never_a_prune_and_nan_always_is() -> None:
    study = optuna.create_study(pruner=TolerantSuccessiveHalvingPruner(100, 3, tolerance=0.05))
    assert not study.ask().should_prune()
    # A NaN at a rung is pruned even when it is the only value there (it would compare as "best").
    assert _rung_attrs(TolerantSuccessiveHalvingPruner(100, 3, tolerance=0.05), [(100, float("nan"))])[1]
    assert not _rung_attrs(TolerantSuccessiveHalvingPruner(100, 3, tolerance=0.05), [(50, float("nan"))])[1]
