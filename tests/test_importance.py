"""lit_sft.study.importance: importance at the first rung, pruned trials included."""

from __future__ import annotations

import math
import random

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lit_sft.pruner import TolerantSuccessiveHalvingPruner
from lit_sft.study.importance import format_numbers, importances, value_at_rung
from lit_sft.study.report import study_rungs

DISTS = {
    "learning_rate": FloatDistribution(1e-4, 3e-2, log=True),
    "batch_size": CategoricalDistribution([8, 16, 32, 64]),
    "weight_decay": FloatDistribution(0.0, 0.1),
}


def _lr_decides(lr: float) -> float:
    """The first-rung loss as a function of the learning rate alone: best at 2e-3."""
    return 0.5 + (math.log10(lr) - math.log10(2e-3)) ** 2


def _trial(state: TrialState, params: dict, at_rung: float | None, *, rung: int = 4000, record: bool = True, value: float | None = None):
    intermediate = {2000: 3.0}
    system = {}
    if at_rung is not None:
        intermediate[rung] = at_rung
        if record and math.isfinite(at_rung):
            system["completed_rung_0"] = at_rung
    return create_trial(state=state, params=params, distributions=DISTS, intermediate_values=intermediate,
                        value=value if state == TrialState.COMPLETE else None, system_attrs=system, user_attrs={"rungs": [rung, 3 * rung]})


def _lr_study(n_pruned: int = 10, seed: int = 0) -> optuna.Study:
    """Only two trials complete (ASHA pruned the rest); the learning rate alone decides the rung value."""
    rng = random.Random(seed)
    study = optuna.create_study()
    for i in range(n_pruned + 2):
        params = {"learning_rate": 10 ** rng.uniform(-4, math.log10(3e-2)), "batch_size": rng.choice([8, 16, 32, 64]),
                  "weight_decay": rng.uniform(0.0, 0.1)}
        state = TrialState.COMPLETE if i >= n_pruned else TrialState.PRUNED
        # The two survivors differ in weight decay and batch size far more than in learning rate.
        if state == TrialState.COMPLETE:
            params = {"learning_rate": 2e-3 * (1.1 if i % 2 else 1.0), "batch_size": 8 if i % 2 else 64, "weight_decay": 0.09 if i % 2 else 0.0}
        study.add_trial(_trial(state, params, _lr_decides(params["learning_rate"]), value=0.3 - params["weight_decay"]))
    return study


def test_first_rung_importance_counts_pruned_trials_and_finds_the_learning_rate():
    study = _lr_study()
    result = importances(study, study.trials, [4000, 12000])
    first = result["first_rung"]
    assert first["examples"] == 4000 and first["trials"] == list(range(12)) and first["pruned"] == 10
    assert max(first["values"], key=first["values"].get) == "learning_rate"
    assert first["values"]["learning_rate"] > 0.5  # more than the other two together
    assert sum(first["values"].values()) == pytest.approx(1.0, abs=1e-3)
    # Two complete trials are too few to rank three parameters: not computed, and said why.
    assert result["complete"] is None and "2 complete trials" in result["skipped"]["complete"]


def test_complete_importance_is_added_when_enough_trials_complete():
    study = _lr_study(n_pruned=6)
    # Four survivors at one learning rate and batch size: their final values follow weight decay alone.
    for wd in (0.0, 0.03, 0.06, 0.09):
        params = {"learning_rate": 2e-3, "batch_size": 16, "weight_decay": wd}
        study.add_trial(_trial(TrialState.COMPLETE, params, _lr_decides(2e-3), value=0.3 - wd))
    result = importances(study, study.trials, [4000])
    assert result["complete"]["trials"] == [6, 7, 8, 9, 10, 11]
    assert max(result["complete"]["values"], key=result["complete"]["values"].get) == "weight_decay"
    assert max(result["first_rung"]["values"], key=result["first_rung"]["values"].get) == "learning_rate"
    assert result["skipped"] == {}


def test_value_at_rung_prefers_what_the_pruner_recorded():
    recorded = create_trial(state=TrialState.PRUNED, params={}, distributions={}, intermediate_values={4000: 1.0, 6000: 0.9},
                            system_attrs={"completed_rung_0": 1.5})
    assert value_at_rung(recorded, 4000) == 1.5
    unrecorded = create_trial(state=TrialState.PRUNED, params={}, distributions={}, intermediate_values={2000: 2.0, 4096: 1.2, 8192: 0.9})
    assert value_at_rung(unrecorded, 4000) == 1.2  # the first report at or past the rung
    assert value_at_rung(unrecorded, 10000) is None  # never reached it
    assert value_at_rung(unrecorded, None) is None


def test_diverged_trials_count_as_the_worst_and_failed_trials_not_at_all():
    study = _lr_study(n_pruned=6)
    study.add_trial(_trial(TrialState.PRUNED, {"learning_rate": 2.5e-2, "batch_size": 8, "weight_decay": 0.05}, math.nan))
    study.add_trial(_trial(TrialState.FAIL, {"learning_rate": 1e-3, "batch_size": 8, "weight_decay": 0.05}, 0.7))
    first = importances(study, study.trials, [4000])["first_rung"]
    assert 8 in first["trials"] and 9 not in first["trials"]
    assert first["nonfinite"] == 1 and first["pruned"] == 7


def test_too_few_trials_at_the_rung_say_why():
    study = _lr_study(n_pruned=1)
    result = importances(study, study.trials, [4000])
    assert result["first_rung"] is None and result["skipped"]["first_rung"] == "3 trials reached the first rung; importance needs 4"
    # No rung known and nothing recorded by a pruner: nothing reached "the first rung".
    plain = optuna.create_study()
    for lr in (1e-4, 1e-3, 1e-2, 3e-2):
        plain.add_trial(create_trial(params={"learning_rate": lr}, distributions={"learning_rate": DISTS["learning_rate"]}, value=lr,
                                     intermediate_values={100: lr}))
    assert importances(plain, plain.trials, [])["first_rung"] is None


def test_rungs_come_from_the_trials_else_from_the_pruner():
    study = _lr_study(n_pruned=2)
    assert study_rungs(study, study.trials) == [4000, 12000]
    pruned_by = optuna.create_study(pruner=TolerantSuccessiveHalvingPruner(min_resource=300, reduction_factor=3, min_early_stopping_rate=1))
    assert study_rungs(pruned_by, []) == [900]
    assert study_rungs(optuna.create_study(), []) == []  # the default MedianPruner has no rungs


def test_format_numbers_joins_runs():
    assert format_numbers([0, 1, 2, 3, 5, 7, 8, 10, 11, 12]) == "0-3, 5, 7, 8, 10-12"
    assert format_numbers([4]) == "4"
