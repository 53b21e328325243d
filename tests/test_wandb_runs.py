"""W&B runs that tell the truth: read back from the offline run files, as `wandb sync` would send them."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

import train as train_cli
from lit_sft.cli import run_cli
from lit_sft.study import run
from tests.helpers import RaiseAtSecondBatch, sqlite_url, study_cfg, wrap_train
from tests.wandb_files import read_runs

SPACE = """\
learning_rate: {kind: float, low: 1.0e-4, high: 5.0e-2, log: true, key: model.learning_rate}
batch_size: {kind: categorical, choices: [8, 16], key: data.batch_size}
"""


@pytest.mark.slow
def test_each_trial_run_has_its_effective_config_best_summary_and_state(tiny_model_path, tmp_path, monkeypatch, capsys):
    cfg = study_cfg(
        tiny_model_path, tmp_path, SPACE, "truth",
        study={"n_trials": 3, "pruner": {"enabled": True, "min_resource": 32, "reduction_factor": 2, "tolerance": 0.0}},
        budget={"examples": 48, "eval_every_examples": 16},
        wandb={"enabled": True, "mode": "offline", "save_dir": str(tmp_path / "wandb")},
    )
    cfg["trainer"].update(max_steps=500, val_check_interval=50)  # the budget decides the steps that run
    storage = sqlite_url(Path(cfg["study"]["results_dir"]))
    Path(cfg["study"]["results_dir"]).mkdir(parents=True)
    study = optuna.create_study(study_name="truth", storage=storage)
    for lr in (3e-2, 1e-4, 3e-2):  # learns; learns too little, pruned at the first rung; crashes
        study.enqueue_trial({"learning_rate": lr, "batch_size": 8})
    wrap_train(monkeypatch, {2: [RaiseAtSecondBatch(RuntimeError("disk on fire"))]})
    run.tune(cfg)

    trials = optuna.load_study(study_name="truth", storage=storage).trials
    runs = {r.name: r for r in read_runs(tmp_path / "wandb")}
    assert sorted(runs) == ["trial-0000", "trial-0001", "trial-0002"]
    assert {r.group for r in runs.values()} == {"truth"}
    complete, pruned, failed = runs["trial-0000"], runs["trial-0001"], runs["trial-0002"]
    # The config that ran: steps and evaluation cadence from the budget, every section, the trial.
    assert complete.config["trainer"]["max_steps"] == 6 and complete.config["trainer"]["val_check_interval"] == 2
    for section in ("model", "data", "budget", "early_stopping", "evaluator", "wandb", "study"):
        assert section in complete.config, section
    assert complete.config["model"]["learning_rate"] == 3e-2 and complete.config["params"] == trials[0].params
    assert complete.config["study"]["name"] == "truth" and complete.config["trial"] == 0
    # The summary holds the best evaluation's values, which the study records, and the state.
    assert complete.summary["eval/loss"] == pytest.approx(trials[0].value)
    assert complete.summary["best_examples_seen"] == trials[0].user_attrs["best_examples_seen"]
    assert complete.summary["state"] == "complete" and "complete" in complete.tags and complete.exit_code == 0
    assert pruned.summary["state"] == "pruned" and "pruned" in pruned.tags
    assert pruned.summary["pruned_at"] == trials[1].user_attrs["pruned_at"] == 32
    assert failed.summary["state"] == "failed" and "failed" in failed.tags and failed.exit_code == 1
    assert "disk on fire" in failed.summary["failure"]


def test_train_py_runs_are_named_grouped_and_in_folders_of_their_own(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--model.model_name_or_path", tiny_model_path, "--data.num_generated", "64", "--data.eval_size", "8",
            "--data.batch_size", "8", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
            "--budget.examples", "null", "--budget.eval_every_examples", "null", "--evaluator.enabled", "false",
            "--trainer.enable_progress_bar", "false", "--output_dir", str(tmp_path / "train"),
            "--wandb.save_dir", str(tmp_path / "wandb")]
    assert run_cli(train_cli.main, argv) == 0
    assert run_cli(train_cli.main, argv) == 0
    folders = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert folders == ["run-000", "run-001"]
    for folder in folders:
        assert (tmp_path / "train" / folder / "best_model" / "config.json").is_file()
    runs = read_runs(tmp_path / "wandb")
    assert sorted(r.name for r in runs) == folders and {r.group for r in runs} == {"train"}
    assert all(r.summary["state"] == "complete" and r.config["trainer"]["max_steps"] == 4 for r in runs)
