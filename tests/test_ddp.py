"""A trial on two processes: Lightning's DDP on CPU (gloo), ranks started by the tuner.

Only rank 0 creates and reports trials, posts checkpoints and logs to W&B; the pruning and
early-stopping decisions reach rank 1, so a pruned trial ends on both ranks and nothing hangs.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from lit_sft.devices import trial_world_size
from lit_sft.study.ranks import rank_config
from tests.helpers import sqlite_url
from tests.test_workers import tune_argv, tune_env

GOOD = {"learning_rate": 3e-2, "batch_size": 8, "weight_decay": 0.0}
SLOW = {"learning_rate": 1e-4, "batch_size": 8, "weight_decay": 0.0}
RANK_COMMAND = "from lit_sft.study.ranks import rank_main"


def _rank_processes() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if RANK_COMMAND in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_world_size_and_what_other_ranks_leave_to_rank_0():
    assert trial_world_size({"accelerator": "cpu", "devices": 2}) == 2
    assert trial_world_size({"accelerator": "cpu", "devices": "auto"}) == 1
    assert trial_world_size({"accelerator": "gpu", "devices": [0, 3]}) == 2
    assert trial_world_size({"accelerator": "gpu", "devices": "0,1,2"}) == 3
    cfg = {"evaluator": {"enabled": True}, "wandb": {"enabled": True}, "trainer": {"devices": 2}}
    ranks = rank_config(cfg)
    assert ranks["evaluator"]["enabled"] is False and ranks["wandb"]["enabled"] is False
    assert cfg["evaluator"]["enabled"] is True  # the trial's own config is untouched


@pytest.mark.slow
def test_a_ddp_trial_reports_once_and_a_pruned_one_ends_on_every_rank(tiny_model_path, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    study = optuna.create_study(study_name="ddp", storage=sqlite_url(results))
    study.enqueue_trial(GOOD)
    study.enqueue_trial(SLOW)  # learns so little that ASHA stops it at its second rung
    argv = tune_argv(
        tiny_model_path, results, "ddp", "--study.n_trials", "2",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--study.pruner.enabled", "true", "--study.pruner.reduction_factor", "2",
        "--evaluator.enabled", "true", "--evaluator.num_problems", "4", "--evaluator.max_new_tokens", "4",
        "--evaluator.batch_size", "4", "--evaluator.final_wait_s", "120",
        "--wandb.enabled", "true", "--wandb.save_dir", str(tmp_path / "wandb"),
        # No evaluation improves by 100: early stopping ends every trial at its 3rd evaluation.
        "--early_stopping.patience", "2", "--early_stopping.min_delta", "100", max_steps=10,
    )
    run = subprocess.run(argv, cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=300, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]

    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # a second rank did train
    assert _rank_processes() == []  # and every rank process has ended
    trials = optuna.load_study(study_name="ddp", storage=sqlite_url(results)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]  # no trial from rank 1
    # Examples seen are global: 8 per step over both ranks, as in a one-process trial.
    assert sorted(trials[0].intermediate_values) == [16, 32, 48]
    # Early stopping ended both ranks at step 6 of 10; the pruner ended trial 1 before that, at step 4.
    assert trials[0].user_attrs["stopped_early"] is True and trials[0].user_attrs["global_step"] == 6
    assert sorted(trials[1].intermediate_values) == [16, 32]
    assert trials[1].user_attrs["pruned_at"] == 32 and trials[1].user_attrs["global_step"] == 4
    # Rank 0 alone posted checkpoints (one evaluation per validation) and logged to W&B.
    for trial, steps in ((trials[0], [2, 4, 6]), (trials[1], [2, 4])):
        history = json.loads((results / "trials" / "ddp" / f"trial-{trial.number:04d}" / "history.json").read_text())
        assert [e["step"] for e in history["evaluations"]] == steps
        assert all(e["status"] == "ok" for e in history["evaluations"])
    assert len(list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))) == 2
    assert not list(results.rglob("ranks.json")) and not list((results / "trials").rglob("*.safetensors"))


@pytest.mark.slow
def test_a_stop_decided_by_an_evaluator_result_ends_every_rank(tiny_model_path, tmp_path):
    """eval/accuracy arrives on rank 0 only, mid-training; StopSync hands its stop to rank 1."""
    results = tmp_path / "results"
    results.mkdir()
    study = optuna.create_study(study_name="ddp-acc", storage=sqlite_url(results), direction="maximize")
    study.enqueue_trial(SLOW)
    argv = tune_argv(
        tiny_model_path, results, "ddp-acc", "--study.n_trials", "1",
        "--study.metric", "eval/accuracy", "--study.direction", "maximize",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--evaluator.enabled", "true", "--evaluator.num_problems", "4", "--evaluator.max_new_tokens", "4",
        "--evaluator.batch_size", "4", "--evaluator.final_wait_s", "120",
        # No grade improves by 100: early stopping ends the trial at its 2nd graded evaluation.
        "--early_stopping.patience", "1", "--early_stopping.min_delta", "100", max_steps=200,
    )
    run = subprocess.run(argv, cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=300, check=False)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output and _rank_processes() == []
    (trial,) = optuna.load_study(study_name="ddp-acc", storage=sqlite_url(results)).trials
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["stopped_early"] is True
    assert trial.user_attrs["global_step"] < 200  # both ranks stopped at the same step, long before the end
    assert sorted(trial.intermediate_values)[:2] == [16, 32]  # grades reported at their checkpoints
