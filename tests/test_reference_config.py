"""The reference config (configs/qwen2.5-math-1.5b) as shipped, run end to end on CPU: only the
model (the tiny one), the devices, the data locations and the lengths are swapped in. The data are
small folders in the Hub layout and field names of the datasets it names
(rasbt/math_full_minus_math500, HuggingFaceH4/MATH-500), built here: nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lit_sft.config import parse
from lit_sft.errors import UserError
from tests.math_datasets import TEST_ID, TRAIN_ID, hub_layout, math_train, reference_data

datasets = pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "configs/qwen2.5-math-1.5b"


def test_the_reference_configs_name_no_file_outside_the_repository():
    for path in REFERENCE.glob("*.yaml"):
        data = yaml.safe_load(path.read_text())["data"]
        for key in ("train_path", "validation_path", "test_path"):
            value = data.get(key)
            assert value is None or not value.startswith(("..", "/")), f"{path.name}: data.{key} = {value}"
        assert data["train_path"] == TRAIN_ID and data["schema"] == "problem_solution"
    tune = yaml.safe_load((REFERENCE / "tune.yaml").read_text())["data"]
    assert (tune["test_path"], tune["test_split"]) == (TEST_ID, "test")
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert "shared/" not in path.read_text(), path


def test_offline_the_reference_config_says_its_hub_datasets_cannot_be_reached(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        parse(["--config", str(REFERENCE / "tune.yaml")], tune=True)
    assert "\n" not in str(err.value)
    assert f"data.train_path: cannot reach Hugging Face dataset '{TRAIN_ID}'" in str(err.value)
    assert f"data.test_path: cannot reach Hugging Face dataset '{TEST_ID}'" in str(err.value)


@pytest.mark.slow
def test_the_reference_study_runs_end_to_end_on_cpu_with_its_final_test(tiny_model_path, tmp_path, capsys):
    data = reference_data(tmp_path / "hub")
    train, test = data["data.train_path"], data["data.test_path"]
    results = tmp_path / "results"
    argv = [
        "--config", str(REFERENCE / "tune.yaml"),
        # The model, the devices and the data's location: what a CPU without downloads needs.
        "--model.model_name_or_path", tiny_model_path, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
        "--data.train_path", train, "--data.validation_path", train, "--data.test_path", test,
        # Lengths cut down: 500 validation problems, 1024 new tokens, 34,560 examples a trial, a budget of
        # 20 trials' examples (the baseline trial first).
        "--data.num_validation_problems", "8", "--data.num_test_problems", "12", "--evaluator.num_problems", "8",
        "--evaluator.max_new_tokens", "8", "--budget.examples", "576", "--budget.eval_every_examples", "64",
        "--study.pruner.min_resource", "64",
        "--budget.total_examples", "900", "--study.results_dir", str(results), "--study.search_space", str(ROOT / "configs/search_space.yaml"),
        "--output_dir", str(tmp_path / "out"), "--wandb.save_dir", str(tmp_path / "wandb"),
    ]
    cfg = parse(argv, tune=True)
    shipped = yaml.safe_load((REFERENCE / "tune.yaml").read_text())
    assert cfg["study"]["n_trials"] is None and cfg["study"]["pruner"]["reduction_factor"] == 2  # as shipped
    for key in ("max_length", "micro_batch_size", "eval_size", "schema", "validation_schema", "test_schema", "train_split", "validation_split", "test_split"):
        assert cfg["data"][key] == shipped["data"][key], key  # the rest runs as shipped
    import wandb

    from lit_sft.study import run

    try:
        summary = run.tune(cfg)
    finally:
        # W&B runs in this process export WANDB_SERVICE: a later test's subprocess would join this service.
        wandb.teardown()
    assert summary["counts"].get("complete", 0) + summary["counts"].get("pruned", 0) >= 2
    assert {t["params"]["batch_size"] for t in summary["trials"]} <= {32, 64, 128, 256}
    assert summary["baseline"]["params"] == {"learning_rate": 2e-5, "batch_size": 64, "weight_decay": 0.0}
    assert 900 <= summary["budget"]["spent_examples"] < 900 + 768  # + one trial: 3 steps at batch 256
    test_result = summary["test_accuracy"]
    assert test_result is not None and "error" not in test_result, test_result
    assert test_result["n"] == 12 and test_result["source"] == test
    out = capsys.readouterr().out
    assert re.search(r"final test: trial \d+ accuracy [\d.]+ \[[\d.]+, [\d.]+\] on 12 test problems", out)
    report = (results / "REPORT.md").read_text()
    assert "final test accuracy" in report and test in report


def test_without_a_test_set_the_report_and_the_console_say_so_and_name_the_key(tmp_path, capsys):
    """Real data without data.test_path used to end with test_accuracy: null and no word why."""
    import optuna

    from lit_sft.config import complete
    from lit_sft.study.config import StudyConfig
    from lit_sft.study.final_test import NO_TEST_SET, run_final_test
    from lit_sft.study.report import write_report

    train = hub_layout(tmp_path / "hub", TRAIN_ID, "train", math_train(40))
    cfg = complete({"data": {"train_path": train, "schema": "problem_solution"},
                    "study": {"results_dir": str(tmp_path / "results"), "name": "no-test"}}, tune=True)
    study = optuna.create_study(study_name="no-test", storage=f"sqlite:///{tmp_path / 'study.db'}")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    assert run_final_test(study, cfg, StudyConfig.from_dict(cfg["study"])) is None
    summary = write_report(study, metric="eval/loss", n_trials=1, results_dir=tmp_path / "results", plots=False)
    assert summary["test_accuracy"] is None and summary["test_skipped"] == NO_TEST_SET
    assert f"final test: none: {NO_TEST_SET}" in capsys.readouterr().out
    assert f"## Final test\n\nNone: {NO_TEST_SET}." in (tmp_path / "results/REPORT.md").read_text()
    assert "data.test_path" in NO_TEST_SET
    assert yaml.safe_load((tmp_path / "results/study_results.yaml").read_text())["test_skipped"] == NO_TEST_SET
