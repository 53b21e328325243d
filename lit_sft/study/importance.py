"""Hyperparameter importance that counts pruned trials.

Under ASHA most trials are pruned, so importance fitted on complete trials alone rests on the
few survivors, which TPE has already drawn close together: it ranks noise. Every trial that
reached the first rung was measured there at equal data, pruned or not, so the first rung is
where all of them can be compared; the complete trials' importance is kept beside it when
there are enough of them.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

MIN_TRIALS = 4
"""Fewer points than this give fANOVA's forest nothing to split on but noise."""
SEED = 0


def value_at_rung(trial: FrozenTrial, rung: int | None) -> float | None:
    """The value the pruner judged the trial on at the first rung.

    Optuna records it (`completed_rung_0`); a trial without that record (a value that was NaN,
    which ASHA prunes unrecorded, or another pruner) is read at its first report at or past the
    rung, which is the report ASHA judges.
    """
    if "completed_rung_0" in trial.system_attrs:
        return float(trial.system_attrs["completed_rung_0"])
    if rung is None:
        return None
    steps = sorted(step for step in trial.intermediate_values if step >= rung)
    return float(trial.intermediate_values[steps[0]]) if steps else None


def fanova(pairs: list[tuple[FrozenTrial, float]], direction: optuna.study.StudyDirection) -> tuple[dict[str, float] | None, str | None]:
    """fANOVA importances (seeded) of the values over the trials' parameters, or (None, why).

    fANOVA rather than Optuna's default PED-ANOVA: PED-ANOVA compares the top 10% of trials with
    the rest, one trial out of a dozen, and on a study where weight decay does nothing it still
    gave weight decay a quarter of the importance; fANOVA fits the value over the whole space.
    A non-finite value (a diverged run) counts as the worst finite one: dropping it would hide
    exactly the region of the space that failed.
    """
    finite = [v for _, v in pairs if math.isfinite(v)]
    if not finite:
        return None, "no finite value"
    worst = max(finite) if direction == optuna.study.StudyDirection.MINIMIZE else min(finite)
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.WARNING)  # "A new study created in memory" per report is noise
    try:
        study = optuna.create_study(direction=direction)
    finally:
        logger.setLevel(level)
    for trial, value in pairs:
        study.add_trial(optuna.trial.create_trial(params=trial.params, distributions=trial.distributions,
                                                  value=value if math.isfinite(value) else worst))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            values = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=SEED))
    except ImportError:
        return None, "fANOVA needs scikit-learn (pip install scikit-learn)"
    except (ValueError, RuntimeError) as err:
        return None, f"fANOVA could not fit: {err}"  # e.g. every trial has the same parameters
    if not values:
        return None, "no parameter varies between these trials"
    return {name: round(float(v), 4) for name, v in values.items()}, None


def _first_rung(study: optuna.Study, trials: list[FrozenTrial], rung: int | None) -> tuple[dict[str, Any] | None, str | None]:
    # Failed trials are left out: a retry of the same point would count twice.
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    reached = [(t, v) for t in finished if (v := value_at_rung(t, rung)) is not None]
    if len(reached) < MIN_TRIALS:
        return None, f"{len(reached)} trials reached the first rung; importance needs {MIN_TRIALS}"
    values, why = fanova(reached, study.direction)
    if values is None:
        return None, why
    return {
        "examples": rung,
        "trials": [t.number for t, _ in reached],
        "pruned": sum(t.state == TrialState.PRUNED for t, _ in reached),
        "nonfinite": sum(not math.isfinite(v) for _, v in reached),
        "values": values,
    }, None


def _complete(study: optuna.Study, trials: list[FrozenTrial]) -> tuple[dict[str, Any] | None, str | None]:
    done = [(t, float(t.value)) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if len(done) < MIN_TRIALS:
        return None, f"{len(done)} complete trials; importance needs {MIN_TRIALS}"
    values, why = fanova(done, study.direction)
    if values is None:
        return None, why
    return {"trials": [t.number for t, _ in done], "values": values}, None


def importances(study: optuna.Study, trials: list[FrozenTrial], rungs: list[int]) -> dict[str, Any]:
    """`{first_rung: {examples, trials, pruned, nonfinite, values} | None, complete: {trials,
    values} | None, skipped: {which: why}}`."""
    first, why_first = _first_rung(study, trials, min(rungs) if rungs else None)
    complete, why_complete = _complete(study, trials)
    skipped = {k: why for k, why in (("first_rung", why_first), ("complete", why_complete)) if why}
    return {"first_rung": first, "complete": complete, "skipped": skipped}


def format_numbers(numbers: list[int]) -> str:
    """Trial numbers as runs: `0-5, 7, 9-11`."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def describe(which: str, data: dict[str, Any]) -> str:
    """Which trials and which value an importance was fitted on, for titles and the report."""
    n = len(data["trials"])
    if which == "complete":
        return f"{n} complete trials (final value)"
    where = f"{data['examples']:,} examples" if data.get("examples") is not None else "position not recorded"
    return f"{n} trials at the first rung ({where}), pruned included ({data['pruned']} pruned)"
