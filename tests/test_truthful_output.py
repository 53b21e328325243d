"""What a user reads after a study or a train.py run says what happened, and nothing is left over.

One small study (complete, pruned at the first rung, Ctrl-C) and one train.py run with a real
evaluator process; their W&B runs are read back from the offline files.
"""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

import train as train_cli
from lit_sft.cli import run_cli
from lit_sft.storage import FileLock
from tests.helpers import RaiseAtSecondBatch, sqlite_url, study_cfg, tune_interrupted, wrap_train
from tests.wandb_files import read_runs

SPACE = """\
learning_rate: {kind: float, low: 1.0e-4, high: 5.0e-2, log: true, key: model.learning_rate}
batch_size: {kind: categorical, choices: [8, 16], key: data.batch_size}
"""
SECTIONS = {"seed_everything", "output_dir", "model", "data", "trainer", "budget", "early_stopping", "evaluator", "wandb"}
"""A run's W&B config: the config's sections, and what the tuner adds about the trial."""
TRIAL_KEYS = {"study", "trial", "params", "sampled_params"}


@pytest.fixture(scope="module")
def study(tiny_model_path, tmp_path_factory) -> dict[str, Any]:
    """Trial 0 learns, trial 1 is pruned at the first rung, Ctrl-C in trial 2."""
    tmp_path = tmp_path_factory.mktemp("study")
    cfg = study_cfg(
        tiny_model_path, tmp_path, SPACE, "truth",
        study={"n_trials": 3, "pruner": {"enabled": True, "min_resource": 32, "reduction_factor": 2, "tolerance": 0.0}},
        budget={"examples": 48, "eval_every_examples": 16},
        wandb={"enabled": True, "mode": "offline", "save_dir": str(tmp_path / "wandb")},
    )
    results = Path(cfg["study"]["results_dir"])
    results.mkdir(parents=True)
    storage = sqlite_url(results)
    created = optuna.create_study(study_name="truth", storage=storage)
    for lr in (3e-2, 1e-4, 3e-2):
        created.enqueue_trial({"learning_rate": lr, "batch_size": 8})
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out):
        wrap_train(monkeypatch, {2: [RaiseAtSecondBatch(KeyboardInterrupt())]})
        tune_interrupted(cfg)
    return {
        "out": out.getvalue(), "results": results, "trials": optuna.load_study(study_name="truth", storage=storage).trials,
        "runs": {r.name: r for r in read_runs(tmp_path / "wandb")},
        "yaml": yaml.safe_load((results / "study_results.yaml").read_text()),
    }


@pytest.mark.slow
def test_ctrl_c_reads_as_interrupted_in_the_table_the_report_and_wandb(study):
    assert [t.state.name for t in study["trials"]] == ["COMPLETE", "PRUNED", "FAIL"]
    lines = study["out"].splitlines()
    row = next(line for line in lines if line.lstrip().startswith("2 ") and "fail" in line)  # the table's row of trial 2
    assert "interrupted (Ctrl-C)" in row, row
    assert "failed: trial 2: interrupted (Ctrl-C)" in lines
    assert "SystemExit" not in study["out"]
    report = (study["results"] / "REPORT.md").read_text()
    assert "interrupted (Ctrl-C)" in report and "SystemExit" not in report
    assert study["yaml"]["failures"] == [{"number": 2, "reason": "interrupted", "error": "interrupted (Ctrl-C)"}]
    failed = study["runs"]["trial-0002"]
    assert failed.summary["failure"] == "interrupted (Ctrl-C)" and failed.summary["state"] == "failed"


@pytest.mark.slow
def test_a_pruned_trial_did_not_stop_early(study):
    rows = {row["number"]: row for row in study["yaml"]["trials"]}
    assert rows[1]["state"] == "PRUNED" and rows[1]["pruned_at"] == 32
    assert rows[1]["stopped_early"] is False
    assert study["runs"]["trial-0001"].summary["stopped_early"] is False


@pytest.mark.slow
def test_wandb_config_holds_the_sections_and_no_flat_copies(study):
    for name, wandb_run in study["runs"].items():
        keys = {k for k in wandb_run.config if not k.startswith("_")}
        assert keys - SECTIONS - TRIAL_KEYS == set(), (name, sorted(keys - SECTIONS - TRIAL_KEYS))
        assert wandb_run.config["trainer"]["gradient_clip_val"] is None
        assert wandb_run.config["data"]["tokenizer_name_or_path"] is None


@pytest.mark.slow
def test_eval_loss_is_logged_at_the_step_of_its_evaluation(study):
    complete = study["runs"]["trial-0000"]
    steps = [row["trainer/global_step"] for row in complete.history if "eval/loss" in row]
    assert steps == [2, 4, 6]  # an evaluation every 2 optimizer steps (16 examples at batch 8)
    assert complete.summary["best_step"] in steps
    at_best = next(row for row in complete.history if "eval/loss" in row and row["trainer/global_step"] == complete.summary["best_step"])
    assert at_best["eval/loss"] == pytest.approx(complete.summary["eval/loss"])
    train_steps = [row["trainer/global_step"] for row in complete.history if "train/loss" in row]
    assert train_steps and all(step % 5 == 0 for step in train_steps)  # log_every_n_steps: 5 optimizer steps


@pytest.mark.slow
def test_no_lock_files_are_left_in_the_results_folder(study):
    left = [p.name for p in study["results"].rglob("*") if "lock" in p.name]
    assert left == []


def test_a_file_lock_excludes_and_leaves_no_file(tmp_path):
    path, counter = tmp_path / ".x.lock", tmp_path / "count"
    counter.write_text("0")

    def add(times: int) -> None:
        for _ in range(times):
            with FileLock(path):
                counter.write_text(str(int(counter.read_text()) + 1))

    threads = [threading.Thread(target=add, args=(100,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.read_text() == "400"
    assert not path.exists()


@pytest.mark.slow
def test_train_py_with_the_evaluator_logs_one_step_per_evaluation_and_leaves_no_clutter(tiny_model_path, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--model.model_name_or_path", tiny_model_path, "--data.num_generated", "64", "--data.eval_size", "8",
            "--data.num_validation_problems", "4", "--data.batch_size", "8", "--trainer.max_steps", "4",
            "--trainer.val_check_interval", "2", "--budget.examples", "null", "--budget.eval_every_examples", "null",
            "--evaluator.enabled", "true", "--evaluator.backend", "transformers", "--evaluator.device", "cpu",
            "--evaluator.max_new_tokens", "8", "--evaluator.final_wait_s", "120",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "true",
            "--output_dir", str(tmp_path / "train"), "--wandb.save_dir", str(tmp_path / "wandb")]
    assert run_cli(train_cli.main, argv) == 0
    out, err = capfd.readouterr()
    # The model summary counts parameters; it has no FLOPs to show (Lightning printed 0).
    assert "Total params" in out and "flops" not in (out + err).lower()
    assert "Loading weights" not in out + err and "Writing model shards" not in out + err
    run_dir = tmp_path / "train" / "run-000"
    assert sorted(p.name for p in run_dir.iterdir()) == ["best_model"]  # no empty weights/ folder
    (wandb_run,) = read_runs(tmp_path / "wandb")
    loss_steps = [row["trainer/global_step"] for row in wandb_run.history if "eval/loss" in row]
    accuracy_steps = sorted(row["trainer/global_step"] for row in wandb_run.history if "eval/accuracy" in row)
    assert loss_steps == accuracy_steps == [2, 4]
    assert wandb_run.summary["best_step"] in loss_steps


def test_the_cli_shows_no_transformers_bar_for_a_model_load_or_save(tiny_model_path, tmp_path, capfd):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers import AutoModelForCausalLM

    from lit_sft.cli import quiet

    quiet()
    AutoModelForCausalLM.from_pretrained(tiny_model_path).save_pretrained(tmp_path / "saved")
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and "Writing model shards" not in out + err
    assert not are_progress_bars_disabled()  # a download from the Hub keeps its bar
