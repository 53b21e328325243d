"""report.py: study_results.yaml, the trials table and the plots, from a real SQLite study."""

from __future__ import annotations

import math
import struct

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lit_sft.study.report import load_history, save_history, write_report

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
    _add(study, results, 0, TrialState.COMPLETE, 3e-3, 16, 200)
    _add(study, results, 1, TrialState.COMPLETE, 1e-3, 32, 200)
    _add(study, results, 2, TrialState.PRUNED, 2e-4, 8, 50, pruned_at=400)
    _add(study, results, 3, TrialState.FAIL, 5e-3, 64, 0, error="RuntimeError: boom", reason="exception")
    _add(study, results, 4, TrialState.COMPLETE, 8e-3, 64, 100)
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

    table = printed[0].splitlines()
    assert table[0].split()[:5] == ["trial", "state", "learning_rate", "batch_size", "weight_decay"]
    assert len(table) == 2 + 5
    assert any(line.startswith(f"{best.number}*") for line in table)
    assert any("pruned at 400 examples" in line for line in table)
    assert any(line.startswith("failed: trial 3 (exception): RuntimeError: boom") for line in printed)

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
