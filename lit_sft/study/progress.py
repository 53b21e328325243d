"""The console lines of a study: one when a trial starts, one when it ends."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lit_sft.study.budget import is_baseline, spent
from lit_sft.failures import failure_text
from lit_sft.study.config import StudyConfig
from lit_sft.study.results import accuracy_figures, format_accuracy, format_value


def _head(number: int, n_trials: int | None, slot: int | None) -> str:
    """`[k/n] trial N` (`[k] trial N` without a cap): k counts the study's trials (over restarts
    and workers), N is Optuna's number."""
    k = slot or number + 1
    return f"[{k}/{n_trials}] trial {number}" if n_trials else f"[{k}] trial {number}"


def progress_start(trial: optuna.Trial, params: dict[str, Any], n_trials: int | None, slot: int | None = None, note: str = "") -> None:
    shown = " ".join(f"{k}={format_value(v)}" for k, v in params.items())
    attrs = trial.user_attrs if hasattr(trial, "user_attrs") else {}
    retry_of = attrs.get("retry_of")
    again = f" (retry of trial {retry_of})" if retry_of is not None else ""
    if is_baseline(trial):
        again += " (baseline: your config's values, run in full)"
    print(f"{_head(trial.number, n_trials, slot)} start{again}: {shown}{' | ' + note if note else ''}", flush=True)


class Progress:
    """One line per finished trial: its outcome, the best so far."""

    def __init__(self, study_cfg: StudyConfig, slots: dict[int, int] | None = None, total_examples: int | None = None) -> None:
        self.study_cfg = study_cfg
        self.slots = slots if slots is not None else {}
        self.total_examples = total_examples

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        cfg = self.study_cfg
        a = trial.user_attrs
        head = f"{_head(trial.number, cfg.n_trials, self.slots.get(trial.number))} {trial.state.name.lower()}"
        secs = f" in {trial.duration.total_seconds():.0f}s" if trial.duration else ""
        accuracy, interval, n = accuracy_figures(a)
        acc = f" accuracy={format_accuracy(accuracy, interval, n)}" if accuracy is not None else ""
        if trial.state == TrialState.COMPLETE:
            body = f" {cfg.metric}={format_value(trial.value)}{acc} (best at {a.get('best_examples_seen')} examples){secs}"
        elif trial.state == TrialState.PRUNED:
            body = f" at {a.get('pruned_at')} examples ({cfg.metric} best {format_value(a.get('best_objective'))}{',' + acc if acc else ''}){secs}"
        else:
            where = f" [traceback: {a['traceback_file']}]" if "traceback_file" in a else ""
            body = failure_text(a.get("reason", "?"), a.get("error", "no error recorded"), " ({reason}): {error}", ": {error}") + where
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = f"best: trial {study.best_trial.number} {cfg.metric}={format_value(study.best_value)}" if complete else "best: none yet"
        used = spent(study.get_trials(deepcopy=False), self.total_examples)
        print(f"{head}{body} | {best} | {used.describe()}", flush=True)
