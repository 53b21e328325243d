"""The final test: the best model graded once, after the study, on problems no selection step saw."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from lit_sft.data import SFTDataModule
from lit_sft.errors import UserError
from lit_sft.study import run
from lit_sft.study.final_test import ATTR
from tests.helpers import sqlite_url, study_cfg

SPACE = """\
learning_rate: {kind: float, low: 1.0e-3, high: 3.0e-2, log: true, key: model.learning_rate}
"""


def _load(cfg) -> optuna.Study:
    return optuna.load_study(study_name=cfg["study"]["name"], storage=sqlite_url(Path(cfg["study"]["results_dir"])))


@pytest.mark.slow
def test_an_accuracy_study_grades_its_best_model_on_the_test_split_once(tiny_model_path, tmp_path, capsys):
    cfg = study_cfg(
        tiny_model_path, tmp_path, SPACE, "acc",
        study={"n_trials": 2, "metric": "eval/accuracy", "direction": "maximize", "save_best_model": True},
        data={"num_validation_problems": 8, "num_test_problems": 12},
        evaluator={"enabled": True, "num_problems": 8, "max_new_tokens": 8, "batch_size": 12, "final_wait_s": 120},
    )
    summary = run.tune(cfg)
    study = _load(cfg)
    assert study.metric_names == ["eval/accuracy"]  # the dashboard's label
    best = study.best_trial
    test = study.user_attrs[ATTR]
    assert test["trial"] == best.number and "error" not in test
    assert test["n"] == 12 and sum(test["categories"].values()) == 12
    lo, hi = test["accuracy_ci"]
    assert lo <= test["accuracy"] <= hi and hi > lo
    assert test["source"] == "generated test split"
    # Every trial's value is its best graded accuracy, with the interval of that evaluation.
    for trial in study.trials:
        assert trial.value == max(e["accuracy"] for e in _evaluations(cfg, trial.number) if e["status"] == "ok")
        assert trial.user_attrs["accuracy_n"] == 8 and len(trial.user_attrs["accuracy_ci"]) == 2
    assert summary["test_accuracy"]["accuracy"] == test["accuracy"]
    assert f"final test: grading trial {best.number}'s best model on 12 test problems" in capsys.readouterr().out

    # Rerun with nothing left to do: the stored result is the best's, so nothing is graded again.
    again = run.tune(cfg)
    assert "final test: grading" not in capsys.readouterr().out and again["test_accuracy"] == summary["test_accuracy"]
    # A result for another trial is stale (the best changed, e.g. in an extended study): graded again.
    study.set_user_attr(ATTR, {**test, "trial": best.number + 100})
    run.tune(cfg)
    assert _load(cfg).user_attrs[ATTR]["trial"] == best.number
    assert f"final test: grading trial {best.number}'s" in capsys.readouterr().out


def _evaluations(cfg, number: int) -> list[dict]:
    path = Path(cfg["study"]["results_dir"]) / "trials" / cfg["study"]["name"] / f"trial-{number:04d}" / "history.json"
    return json.loads(path.read_text())["evaluations"]


def _problems_file(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(n)))
    return path


def test_the_validation_file_as_test_set_gives_the_problems_after_the_validation_sample(tmp_path):
    path = _problems_file(tmp_path / "problems.jsonl", 30)
    data = SFTDataModule(validation_path=str(path), test_path=str(path), num_validation_problems=10, num_test_problems=15)
    validation = {p.prompt for p in data.validation_problems}
    test = {p.prompt for p in data.test_problems}
    assert len(validation) == 10 and len(test) == 15 and not validation & test
    too_many = SFTDataModule(validation_path=str(path), test_path=str(path), num_validation_problems=30)
    with pytest.raises(UserError, match="no problems beyond the 30 validation ones"):
        too_many.test_problems


def test_generated_test_problems_are_disjoint_from_validation_and_real_data_needs_a_test_path(tmp_path):
    generated = SFTDataModule(num_validation_problems=200, num_test_problems=5000)
    test = [p.prompt for p in generated.test_problems]
    assert not {p.prompt for p in generated.validation_problems} & set(test)
    assert len(test) == len(set(test)) < 5000  # every distinct test question once, none twice
    from lit_sft.synthetic import exercises

    answers = {e.question: e.answer for e in exercises("test")}
    assert all(p.answer == answers[p.prompt.split("User: ")[1].split("\n")[0]] for p in generated.test_problems)
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    assert SFTDataModule(train_path=str(train)).test_problems is None


def test_a_separate_test_file_is_the_test_set(tmp_path):
    validation = _problems_file(tmp_path / "validation.jsonl", 30)
    other = tmp_path / "test.jsonl"
    other.write_text("".join(json.dumps({"problem": f"What is {i} - 1?", "answer": str(i - 1)}) + "\n" for i in range(20)))
    data = SFTDataModule(validation_path=str(validation), test_path=str(other), num_validation_problems=10, num_test_problems=15)
    assert len(data.test_problems) == 15 and all(" - 1?" in p.prompt for p in data.test_problems)
    # With generated validation problems too: the test file, never the generated test split.
    assert all(" - 1?" in p.prompt for p in SFTDataModule(test_path=str(other), num_test_problems=5).test_problems)
