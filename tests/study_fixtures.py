"""A study shaped like the embedded one, without training: TPE and the project's ASHA pruner
run on simulated learning curves, and each trial records the user attrs and history.json the
objective writes. Fast enough for tests; realistic enough to look at the report it gives."""

from __future__ import annotations

import math
import random
import warnings
from pathlib import Path

import optuna

from lit_sft.pruner import TolerantSuccessiveHalvingPruner
from lit_sft.stats import wilson_interval
from lit_sft.study.report import save_history

EVAL_EVERY = 2000
BUDGET = 20000
RUNGS = [4000, 12000]
PROBLEMS = 200
GOOD_LR = 2e-3
DIVERGES_ABOVE = 1.2e-2


def _quality(lr: float) -> float:
    """1 at the best learning rate, falling off over about a decade on either side."""
    return math.exp(-((math.log10(lr) - math.log10(GOOD_LR)) ** 2) / 0.6)


def _evaluation(step: int, seen: int, accuracy: float, rng: random.Random) -> dict:
    correct = sum(rng.random() < accuracy for _ in range(PROBLEMS))
    # The format is learnt early; what is not correct is first mostly unformatted, then wrong.
    format_failure = round((PROBLEMS - correct) * math.exp(-seen / 5000))
    return {"job": step, "run": "sim", "step": step, "examples_seen": seen, "status": "ok", "error": None,
            "accuracy": correct / PROBLEMS, "format_accuracy": 1 - format_failure / PROBLEMS, "correct": correct,
            "wrong_answer": PROBLEMS - correct - format_failure, "format_failure": format_failure,
            "num_problems": PROBLEMS, "mean_response_length": 20.0, "seconds": 1.0}


def _loss(lr: float, seen: int) -> float:
    if lr > DIVERGES_ABOVE:
        return 2.0 + seen / 4000 if seen < 6000 else math.nan
    return 0.3 + 2.5 * math.exp(-seen * _quality(lr) / 3000)


def simulated_objective(results_dir: Path, seed: int = 0, metric: str = "eval/loss"):
    """The objective `metric`: eval/loss (minimized) or eval/accuracy (maximized, as the evaluator's
    results arrive: here at once)."""
    by_accuracy = metric == "eval/accuracy"

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True)
        bs = trial.suggest_categorical("batch_size", [8, 16, 32, 64])
        trial.suggest_float("weight_decay", 0.0, 0.1)
        rng = random.Random(seed * 1000 + trial.number)
        history, evaluations, best = [], [], None
        trial.set_user_attr("rungs", RUNGS)
        trial.set_user_attr("examples_budget", BUDGET)
        for seen in range(EVAL_EVERY, BUDGET + 1, EVAL_EVERY):
            step = seen // bs
            loss = _loss(lr, seen)
            history += [{"step": step, "examples_seen": seen, "train/loss": loss * 0.95},
                        {"step": step, "examples_seen": seen, "eval/loss": loss}]
            accuracy = 0.0 if math.isnan(loss) else 0.97 * _quality(lr) ** 2 * (1 - math.exp(-seen / 3000))
            evaluations.append(_evaluation(step, seen, accuracy, rng))
            value = evaluations[-1]["accuracy"] if by_accuracy else loss
            if by_accuracy:
                history.append({"step": step, "examples_seen": seen, metric: value})
            if not math.isnan(value) and (best is None or (value > best[0] + 1e-3 if by_accuracy else value < best[0] - 1e-3)):
                best = (value, step, seen, evaluations[-1])
            _record(trial, best, seen)
            trial.report(value, seen)
            if trial.should_prune():
                trial.set_user_attr("pruned_at", seen)
                save_history(results_dir, trial.study.study_name, trial.number, history, evaluations)
                raise optuna.TrialPruned()
        save_history(results_dir, trial.study.study_name, trial.number, history, evaluations)
        return best[0]

    return objective


def _record(trial: optuna.Trial, best: tuple | None, seen: int) -> None:
    trial.set_user_attr("examples_seen", seen)
    trial.set_user_attr("stopped_early", False)
    if best is None:
        trial.set_user_attr("best_objective", math.nan)
        return
    loss, step, at, evaluation = best
    trial.set_user_attr("best_objective", loss)
    trial.set_user_attr("best_step", step)
    trial.set_user_attr("best_examples_seen", at)
    trial.set_user_attr("accuracy", evaluation["accuracy"])
    trial.set_user_attr("accuracy_step", step)
    trial.set_user_attr("accuracy_n", PROBLEMS)
    trial.set_user_attr("accuracy_ci", list(wilson_interval(evaluation["correct"], PROBLEMS)))
    trial.set_user_attr("categories", {k: evaluation[k] for k in ("correct", "wrong_answer", "format_failure")})


def simulated_study(storage: str | None, results_dir: Path, n_trials: int = 12, name: str = "sim", seed: int = 0,
                    metric: str = "eval/loss") -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=3, multivariate=True)
    pruner = TolerantSuccessiveHalvingPruner(min_resource=RUNGS[0], reduction_factor=3, tolerance=0.05)
    direction = "maximize" if metric == "eval/accuracy" else "minimize"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner, direction=direction)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])  # as build.py names it: Optuna's plots label their axis by it
        study.optimize(simulated_objective(results_dir, seed, metric), n_trials=n_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def set_final_test(study: optuna.Study, trial: int, correct: int = 470, n: int = 500) -> None:
    study.set_user_attr("final_test", {
        "trial": trial, "accuracy": correct / n, "accuracy_ci": list(wilson_interval(correct, n)), "n": n,
        "categories": {"correct": correct, "wrong_answer": n - correct - 5, "format_failure": 5},
        "source": "generated test split", "format_accuracy": 1 - 5 / n,
    })
