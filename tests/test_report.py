"""report.py: study_results.yaml, the trials table, the closing lines, the progress lines and the
plots, from a real SQLite study."""

from __future__ import annotations

import math
import struct
import warnings

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lit_sft.stats import wilson_interval
from lit_sft.study.config import StudyConfig
from lit_sft.study.progress import Progress
from lit_sft.study.report import load_history, save_history, summarize, write_report

DISTS = {
    "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
    "batch_size": CategoricalDistribution([8, 16, 32, 64]),
    "weight_decay": FloatDistribution(0.0, 0.1),
}


def _curve(lr: float, bs: int, steps: int) -> tuple[list[dict], list[dict]]:
    """Loss curves shaped like a run's: faster descent for larger learning rates."""
    history, evaluations = [], []
    for step in range(5, steps + 1, 5):
        seen = step * bs
        history.append({"step": step, "examples_seen": seen, "train/loss": 3.0 * math.exp(-lr * seen / 5) + 0.5})
        if step % 25 == 0:
            history.append({"step": step, "examples_seen": seen, "eval/loss": 3.2 * math.exp(-lr * seen / 6) + 0.6})
            correct = min(200, int(200 * (1 - math.exp(-lr * seen / 8))))
            evaluations.append({"step": step, "examples_seen": seen, "status": "ok", "accuracy": correct / 200,
                                "correct": correct, "wrong_answer": (200 - correct) // 2, "format_failure": 200 - correct - (200 - correct) // 2})
    return history, evaluations


def _add(study: optuna.Study, results_dir, number: int, state: TrialState, lr: float, bs: int, steps: int, **attrs) -> None:
    params = {"learning_rate": lr, "batch_size": bs, "weight_decay": 0.05}
    history, evaluations = _curve(lr, bs, steps) if steps else ([], [])
    evals = [r for r in history if "eval/loss" in r]
    best = min(evals, key=lambda r: r["eval/loss"]) if evals else None
    user_attrs = dict(attrs)
    if best:
        at = next(e for e in evaluations if e["step"] == best["step"])
        user_attrs.update(best_objective=best["eval/loss"], best_step=best["step"], best_examples_seen=best["examples_seen"],
                          examples_seen=history[-1]["examples_seen"], accuracy=at["accuracy"],
                          categories={k: at[k] for k in ("correct", "wrong_answer", "format_failure")})
    study.add_trial(create_trial(
        state=state, params=params, distributions=DISTS,
        value=best["eval/loss"] if state == TrialState.COMPLETE else None,
        intermediate_values={r["examples_seen"]: r["eval/loss"] for r in evals}, user_attrs=user_attrs,
    ))
    if steps:
        save_history(results_dir, study.study_name, number, history, evaluations)


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture()
def study_dir(tmp_path):
    results = tmp_path / "results"
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="report-test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["eval/loss"])  # as build.py does; Optuna's plots then label by it
    _add(study, results, 0, TrialState.COMPLETE, 3e-3, 16, 200, rungs=[400])
    _add(study, results, 1, TrialState.COMPLETE, 1e-3, 32, 200, rungs=[400])
    _add(study, results, 2, TrialState.PRUNED, 2e-4, 8, 50, pruned_at=400, rungs=[400])
    _add(study, results, 3, TrialState.FAIL, 5e-3, 64, 0, error="RuntimeError: boom", reason="exception")
    _add(study, results, 4, TrialState.COMPLETE, 8e-3, 64, 100, rungs=[400])
    return study, results


def test_results_yaml_table_and_plots(study_dir):
    study, results = study_dir
    printed: list[str] = []
    summary = write_report(study, metric="eval/loss", n_trials=5, results_dir=results, print_fn=printed.append)

    data = yaml.safe_load((results / "study_results.yaml").read_text())
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert data["best_trial"] == best.number
    assert data["best_value"] == pytest.approx(best.value)
    assert set(data["best_params"]) == {"learning_rate", "batch_size", "weight_decay"}
    assert data["counts"] == {"complete": 3, "pruned": 1, "fail": 1}
    by_number = {t["number"]: t for t in data["trials"]}
    assert [t["state"] for t in data["trials"]] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL", "COMPLETE"]
    assert by_number[2]["value"] is None and by_number[2]["pruned_at"] == 400
    assert set(by_number[0]["categories"]) == {"correct", "wrong_answer", "format_failure"}
    assert by_number[0]["accuracy"] is not None and by_number[0]["best_examples_seen"] is not None
    assert by_number[3]["error"] == "RuntimeError: boom"
    assert data["failures"] == [{"number": 3, "reason": "exception", "error": "RuntimeError: boom"}]
    assert data["best_model"] is None  # none saved in this test

    # Recorded before intervals were: the interval is rebuilt from the grade counts.
    correct = by_number[0]["categories"]["correct"]
    assert by_number[0]["accuracy_n"] == 200
    assert by_number[0]["accuracy_ci"] == pytest.approx(list(wilson_interval(correct, 200)), abs=1e-4)
    assert data["best_accuracy_ci"] == by_number[best.number]["accuracy_ci"]
    assert data["importance"]["first_rung"]["trials"] == [0, 1, 2, 4]  # the pruned trial too; not the failed one
    assert "&id" not in (results / "study_results.yaml").read_text()  # no YAML anchors for a reader to chase

    table = printed[0].splitlines()
    assert table[0].split()[:5] == ["trial", "state", "learning_rate", "batch_size", "weight_decay"]
    assert "accuracy [95%]" in table[0]
    acc, (low, high) = by_number[0]["accuracy"], by_number[0]["accuracy_ci"]
    assert any(line.startswith("0 ") and f"{acc:.3f} [{low:.3f}, {high:.3f}]" in line for line in table)
    assert len(table) == 2 + 5
    assert any(line.startswith(f"{best.number}*") for line in table)
    assert any("pruned at 400 examples" in line for line in table)
    assert any(line.startswith("failed: trial 3 (exception): RuntimeError: boom") for line in printed)
    assert f"report: {results / 'REPORT.md'}" in printed and (results / "REPORT.md").is_file()

    expected = {"training_loss.png", "eval_accuracy.png", "hyperparam_comparison.png", "categorization.png",
                "optimization_history.png", "intermediate_values.png", "param_importances.png"}
    assert set(summary["plots"]) == expected, summary.get("plots_skipped")
    for name in expected:
        width, height = _png_size(results / "plots" / name)
        assert width >= 600 and height >= 400


def test_one_complete_trial_skips_importances_and_histories_survive(tmp_path):
    results = tmp_path / "results"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="one")
    _add(study, results, 0, TrialState.COMPLETE, 3e-3, 16, 100)
    _add(study, results, 1, TrialState.FAIL, 5e-3, 64, 0)  # died without recording an error
    # a fresh process: the study from its storage, histories from their files
    reloaded = optuna.load_study(study_name="one", storage=storage)
    assert load_history(results, "one", 0)["history"]
    summary = write_report(reloaded, metric="eval/loss", n_trials=2, results_dir=results, print_fn=lambda _: None)
    assert "param_importances.png" in summary["plots_skipped"]
    assert not (results / "plots" / "param_importances.png").exists()
    assert "training_loss.png" in summary["plots"]
    assert summary["failures"][0]["reason"] == "stale"


def _graded(study: optuna.Study, state: TrialState, loss: float, correct: int, n: int = 200, **attrs) -> None:
    """A trial with the attrs the objective records: value, accuracy and its interval, grades."""
    user_attrs = {"best_objective": loss, "accuracy": correct / n, "accuracy_n": n,
                  "accuracy_ci": list(wilson_interval(correct, n)),
                  "categories": {"correct": correct, "wrong_answer": n - correct, "format_failure": 0}, **attrs}
    study.add_trial(create_trial(state=state, params={"learning_rate": 1e-3 * (1 + len(study.trials))}, distributions={"learning_rate": DISTS["learning_rate"]},
                                 value=loss if state == TrialState.COMPLETE else None, intermediate_values={100: loss}, user_attrs=user_attrs))


def test_trials_tied_with_the_best_are_marked(tmp_path):
    study = optuna.create_study()
    _graded(study, TrialState.COMPLETE, 0.50, 150)  # best: [0.6857, 0.8049]
    _graded(study, TrialState.COMPLETE, 0.60, 140)  # [0.6332, 0.7592]: overlaps
    _graded(study, TrialState.PRUNED, 0.90, 100, pruned_at=400)  # [0.4314, 0.5686]: apart
    _graded(study, TrialState.COMPLETE, 0.70, 163)  # [0.7554, 0.8627]: overlaps from above
    printed: list[str] = []
    summary = write_report(study, metric="eval/loss", n_trials=4, results_dir=tmp_path, plots=False, print_fn=printed.append)

    data = yaml.safe_load((tmp_path / "study_results.yaml").read_text())
    assert data["best_trial"] == 0 and data["tied_with_best"] == [1, 3]
    assert [t["tied_with_best"] for t in data["trials"]] == [None, True, False, True]
    assert data["best_accuracy_ci"] == pytest.approx([0.6857, 0.8049], abs=1e-4)
    table = printed[0].splitlines()
    assert [("tied with the best (95%)" in line) for line in table[2:]] == [False, True, False, True]
    assert "tied with the best at 95%: trials 1, 3" in printed
    assert summary["tied_with_best"] == [1, 3]


def test_pruning_savings_count_examples_against_the_full_budgets():
    study = optuna.create_study()
    _graded(study, TrialState.COMPLETE, 0.5, 150, examples_seen=20000, examples_budget=20000, stopped_early=False)
    _graded(study, TrialState.COMPLETE, 0.6, 140, examples_seen=12000, examples_budget=20000, stopped_early=True)
    _graded(study, TrialState.PRUNED, 0.9, 100, examples_seen=4000, examples_budget=20032)
    _graded(study, TrialState.FAIL, 0.9, 100, examples_seen=2000, examples_budget=20000)  # not counted
    savings = summarize(study, metric="eval/loss", n_trials=4, results_dir="unused")["pruning"]
    assert savings == {"trials": 3, "examples_trained": 36000, "examples_full_budget": 60032, "saved_by_pruning": 16032,
                       "saved_by_early_stopping": 8000, "budget_estimated": False}


def test_pruning_savings_estimate_a_missing_budget_from_a_complete_run():
    study = optuna.create_study()
    _graded(study, TrialState.COMPLETE, 0.5, 150, examples_seen=20000, stopped_early=False)
    _graded(study, TrialState.PRUNED, 0.9, 100, examples_seen=4000)
    savings = summarize(study, metric="eval/loss", n_trials=2, results_dir="unused")["pruning"]
    assert savings["examples_full_budget"] == 40000 and savings["saved_by_pruning"] == 16000
    assert savings["budget_estimated"] is True

    only_pruned = optuna.create_study()
    _graded(only_pruned, TrialState.PRUNED, 0.9, 100, examples_seen=4000)
    assert summarize(only_pruned, metric="eval/loss", n_trials=1, results_dir="unused")["pruning"] is None


def _final_test(trial: int, correct: int = 470, n: int = 500) -> dict:
    return {"trial": trial, "accuracy": correct / n, "accuracy_ci": list(wilson_interval(correct, n)), "n": n,
            "categories": {"correct": correct, "wrong_answer": n - correct - 3, "format_failure": 3},
            "source": "generated test split", "format_accuracy": 1 - 3 / n}


def test_final_test_of_the_best_trial_goes_into_the_results(tmp_path):
    study = optuna.create_study()
    _graded(study, TrialState.COMPLETE, 0.5, 150)
    study.set_user_attr("final_test", _final_test(0))
    printed: list[str] = []
    write_report(study, metric="eval/loss", n_trials=1, results_dir=tmp_path, plots=False, print_fn=printed.append)
    test = yaml.safe_load((tmp_path / "study_results.yaml").read_text())["test_accuracy"]
    assert test["trial"] == 0 and test["stale"] is False and test["n"] == 500
    assert test["accuracy"] == 0.94 and test["ci"] == pytest.approx([0.9156, 0.9577], abs=1e-4)
    assert test["categories"]["format_failure"] == 3 and test["source"] == "generated test split"
    assert "final test: trial 0 accuracy 0.940 [0.916, 0.958] (n=500, generated test split)" in printed


def test_final_test_of_another_trial_is_stale_not_the_best(tmp_path):
    study = optuna.create_study()
    _graded(study, TrialState.COMPLETE, 0.5, 150)
    _graded(study, TrialState.COMPLETE, 0.4, 160)  # became the best after the test graded trial 0
    study.set_user_attr("final_test", _final_test(0))
    printed: list[str] = []
    write_report(study, metric="eval/loss", n_trials=2, results_dir=tmp_path, plots=False, print_fn=printed.append)
    test = yaml.safe_load((tmp_path / "study_results.yaml").read_text())["test_accuracy"]
    assert test["stale"] is True and test["trial"] == 0
    assert test["note"] == "graded trial 0, but trial 1 is the best now"
    line = next(line for line in printed if line.startswith("final test:"))
    assert line.startswith("final test: trial 0 ") and "stale" in line


def test_failed_final_test_is_reported_as_such(tmp_path):
    study = optuna.create_study()
    _graded(study, TrialState.COMPLETE, 0.5, 150)
    study.set_user_attr("final_test", {"trial": 0, "error": "evaluator died"})
    printed: list[str] = []
    write_report(study, metric="eval/loss", n_trials=1, results_dir=tmp_path, plots=False, print_fn=printed.append)
    test = yaml.safe_load((tmp_path / "study_results.yaml").read_text())["test_accuracy"]
    assert test == {"trial": 0, "error": "evaluator died", "stale": False}
    assert "final test: trial 0 failed: evaluator died" in printed


def test_progress_lines_show_accuracy_with_its_interval(capsys):
    study = optuna.create_study()
    _graded(study, TrialState.COMPLETE, 0.5, 150, best_examples_seen=800)
    _graded(study, TrialState.PRUNED, 0.9, 100, pruned_at=400)
    progress = Progress(StudyConfig(n_trials=2))
    for trial in study.trials:
        progress(study, trial)
    complete, pruned = capsys.readouterr().out.splitlines()
    assert "eval/loss=0.5 accuracy=0.750 [0.686, 0.805] (n=200) (best at 800 examples)" in complete
    assert "pruned at 400 examples (eval/loss best 0.9, accuracy=0.500 [0.431, 0.569] (n=200))" in pruned


def test_progress_and_table_without_evaluator(tmp_path, capsys):
    study = optuna.create_study()
    study.add_trial(create_trial(params={"learning_rate": 1e-3}, distributions={"learning_rate": DISTS["learning_rate"]}, value=0.5,
                                 user_attrs={"best_objective": 0.5, "best_examples_seen": 800}))
    Progress(StudyConfig(n_trials=1))(study, study.trials[0])
    assert "accuracy" not in capsys.readouterr().out
    printed: list[str] = []
    summary = write_report(study, metric="eval/loss", n_trials=1, results_dir=tmp_path, plots=False, print_fn=printed.append)
    assert summary["best_accuracy_ci"] is None and summary["tied_with_best"] == [] and summary["test_accuracy"] is None
    assert not any(line.startswith("tied with the best") for line in printed)


def test_accuracy_objective_renders_every_plot(tmp_path):
    from tests.study_fixtures import simulated_study

    study = simulated_study(None, tmp_path, metric="eval/accuracy")
    summary = write_report(study, metric="eval/accuracy", n_trials=12, results_dir=tmp_path, print_fn=lambda _: None)
    assert summary["direction"] == "maximize" and summary["best_value"] == summary["best_accuracy"]
    assert set(summary["plots"]) == {"training_loss.png", "eval_accuracy.png", "hyperparam_comparison.png", "categorization.png",
                                     "optimization_history.png", "intermediate_values.png", "param_importances.png"}, summary["plots_skipped"]
    for path in summary["plots"].values():
        width, height = _png_size(tmp_path / "plots" / path.rsplit("/", 1)[-1])
        assert width >= 600 and height >= 400


def test_a_perfect_accuracy_is_plotted_with_its_interval():
    """200/200: the Wilson bound is 1 - 1e-16, below the value; the plot must still be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_sft.stats import accuracy_interval
    from lit_sft.study.plots import _mark_best_checkpoint

    low, high = accuracy_interval(200, 200)
    fig, ax = plt.subplots()
    _mark_best_checkpoint(ax, {"number": 3, "accuracy_step": 10}, [(640, 10, 1.0, low, high)])
    assert ax.containers and "best checkpoint #3: 1.000" in ax.containers[0].get_label()
    plt.close(fig)
