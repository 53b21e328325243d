"""study.sampler: TPE or GP, both reseeded per trial, built from the config."""

from __future__ import annotations

import optuna
import pytest

from lit_sft.errors import UserError
from lit_sft.study.build import (
    TrialSeededGPSampler,
    TrialSeededTPESampler,
    _PrunedAsComplete,
    make_sampler,
)
from lit_sft.study.config import StudyConfig


def _points(kind: str, n: int, *, prune: bool = False, **sampler) -> list[tuple[float, int]]:
    study = optuna.create_study(sampler=make_sampler(StudyConfig.from_dict({"seed": 7, "sampler": {"kind": kind, **sampler}})))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True)
        batch = trial.suggest_categorical("batch_size", [8, 16, 32, 64])
        if prune:
            trial.report(1.0, 1)
            raise optuna.TrialPruned()
        return (lr - 2e-3) ** 2 * batch

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.optimize(objective, n_trials=n)
    return [(t.params["learning_rate"], t.params["batch_size"]) for t in study.trials]


def test_kinds_and_options_reach_the_sampler():
    tpe = make_sampler(StudyConfig.from_dict({"sampler": {"n_ei_candidates": 64, "n_startup_trials": 2}}))
    assert isinstance(tpe, TrialSeededTPESampler) and tpe._n_ei_candidates == 64 and tpe._n_startup_trials == 2
    gp = make_sampler(StudyConfig.from_dict({"sampler": {"kind": "gp", "n_startup_trials": 4, "deterministic_objective": True}}))
    assert isinstance(gp, TrialSeededGPSampler) and gp._n_startup_trials == 4 and gp._deterministic


def test_bad_sampler_settings_are_user_errors():
    with pytest.raises(UserError, match="study.sampler.kind must be tpe or gp, got 'cmaes'"):
        StudyConfig.from_dict({"sampler": {"kind": "cmaes"}})
    with pytest.raises(UserError, match="study.sampler.n_ei_candidates must be >= 1, got 0"):
        StudyConfig.from_dict({"sampler": {"n_ei_candidates": 0}})


def test_gp_starts_from_the_points_tpe_starts_from_then_models():
    tpe, gp = _points("tpe", 5, n_startup_trials=3), _points("gp", 5, n_startup_trials=3)
    assert gp[:3] == tpe[:3]  # the same random start-up draws: studies of one seed are paired
    assert gp[3:] != tpe[3:]  # from then on each sampler's own model
    assert _points("gp", 3, n_startup_trials=3) == gp[:3]  # reproducible


def test_gp_learns_nothing_from_pruned_trials_tpe_does():
    # Pruned trials do not count as GP's start-up: it keeps drawing the start-up sampler's points.
    # TPE counts them and models the space after n_startup_trials of them.
    random_points = _points("tpe", 5, n_startup_trials=5)
    assert _points("gp", 5, prune=True, n_startup_trials=2) == random_points
    assert _points("tpe", 5, prune=True, n_startup_trials=2)[2:] != random_points[2:]


def test_gp_with_pruned_trials_models_them_at_their_last_report():
    random_points = _points("tpe", 5, n_startup_trials=5)
    learned = _points("gp", 5, prune=True, n_startup_trials=2, gp_use_pruned=True)
    assert learned[:2] == random_points[:2] and learned[2:] != random_points[2:]

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={"x": 1.0}, distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
                                              state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 3.0, 4: 2.0}))
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
                                              state=optuna.trial.TrialState.PRUNED, intermediate_values={}))
    seen = _PrunedAsComplete(study)._get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert [(t.params["x"], t.value, t.state.name) for t in seen] == [(1.0, 2.0, "COMPLETE")]  # no report: left out
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]  # the study's own trials are untouched
