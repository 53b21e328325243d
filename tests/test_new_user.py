"""What a new user hits (issue 21): a second study must not overwrite the first, a misspelled
metric or a missing evaluator device is refused before anything exists, and a study with no
complete trial does not exit 0."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

import tune as tune_cli
from lit_sft.cli import run_cli
from lit_sft.study.config import StudyConfig
from tests.test_tune_bad_input import _argv, _one_error_line


def test_each_study_gets_its_own_results_folder_unless_one_is_given():
    assert StudyConfig(name="tiny-math").results_path == Path("results/optuna/tiny-math")
    assert StudyConfig(name="tiny-math-accuracy").results_path == Path("results/optuna/tiny-math-accuracy")
    assert StudyConfig(name="x", results_dir="/data/mine").results_path == Path("/data/mine")
    assert StudyConfig(name="x").storage_url.endswith("results/optuna/x/optuna.db")


def test_a_folder_holding_another_studys_results_is_refused_and_left_alone(tiny_model_path, tmp_path, capsys):
    results = tmp_path / "results"
    (results / "best_model").mkdir(parents=True)
    (results / "study_results.yaml").write_text("study: quickstart\nbest_value: 0.01\n")
    (results / "best_model" / "lit_sft_trial.json").write_text('{"study": "quickstart", "trial": 1}')
    before = sorted(p.name for p in results.rglob("*"))
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.n_trials", "1")) == 2
    line = _one_error_line(capsys)
    assert f"study.results_dir: {results} holds the results of study 'quickstart'" in line and "--study.name quickstart" in line
    assert sorted(p.name for p in results.rglob("*")) == before  # no study, no lock, no report


@pytest.mark.parametrize("extra, needle", [
    (["--study.metric", "eval/acc"], "study.metric: 'eval/acc' is not a metric a run logs at its evaluations"),
    (["--early_stopping.monitor", "eval/los"], "did you mean eval/loss?"),
    (["--evaluator.enabled", "true", "--evaluator.device", "cuda:3"], "evaluator.device: cuda:3 requested but"),
], ids=["metric-typo", "monitor-typo", "missing-evaluator-device"])
def test_mistakes_found_late_before_are_refused_before_anything_exists(tiny_model_path, tmp_path, capsys, extra, needle):
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.n_trials", "1", *extra)) == 2
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "results").exists()  # no folder, no study in a storage, no W&B run


def test_the_metric_suggestion_names_the_closest(tiny_model_path, tmp_path, capsys):
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.metric", "eval/acc")) == 2
    assert _one_error_line(capsys).endswith("did you mean eval/accuracy?")


def test_a_study_with_no_complete_trial_exits_non_zero(tiny_model_path, tmp_path, capsys):
    # No validation at all: every trial fails with "no finite eval/loss".
    argv = _argv(tiny_model_path, tmp_path, "--study.n_trials", "2", "--trainer.limit_val_batches", "0",
                 "--early_stopping.enabled", "false", "--budget.examples", "null", "--budget.eval_every_examples", "null",
                 "--study.pruner.min_resource", "32", "--study.max_retries", "0")
    assert run_cli(tune_cli.main, argv) == 1
    err = capsys.readouterr().err
    assert "error: study bad has no complete trial (2 fail)" in err
    data = yaml.safe_load((tmp_path / "results" / "study_results.yaml").read_text())
    assert data["counts"] == {"fail": 2}
    assert all(t.state == optuna.trial.TrialState.FAIL for t in optuna.load_study(
        study_name="bad", storage=f"sqlite:///{tmp_path / 'results' / 'optuna.db'}").trials)


def _records(path: Path, n: int) -> Path:
    import json

    with path.open("w") as out:
        for i in range(n):
            out.write(json.dumps({"prompt": f"What is {i} + 1?", "response": f"<think> {i} + 1 = {i + 1} </think> <answer>{i + 1}</answer>",
                                  "ground_truth": str(i + 1)}) + "\n")
    return path


def test_a_batch_the_training_records_cannot_fill_is_refused_before_any_run_exists(tiny_model_path, tmp_path, capsys):
    import train as train_cli
    from tests.test_train_cli import _argv as train_argv

    data = _records(tmp_path / "ten.jsonl", 10)
    argv = train_argv(tiny_model_path, tmp_path, "--data.train_path", str(data), "--data.batch_size", "64",
                      "--output_dir", str(tmp_path / "runs"), "--wandb.enabled", "true", "--wandb.save_dir", str(tmp_path / "wandb"))
    assert run_cli(train_cli.main, argv) == 2
    line = _one_error_line(capsys)
    assert "data.batch_size=64 is larger than the 8 training records (10 in" in line and "2 held out for eval/loss" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "wandb").exists()


def test_a_study_checks_its_search_spaces_batch_sizes_not_the_config_one_it_never_runs(tiny_model_path, tmp_path):
    from lit_sft.config import complete
    from lit_sft.errors import UserError
    from lit_sft.search_space import load_search_space
    from lit_sft.study.run import check_data

    space_file = tmp_path / "space.yaml"
    space_file.write_text("batch_size: {kind: categorical, choices: [64], key: data.batch_size}\n")
    cfg = complete({"model": {"model_name_or_path": tiny_model_path},
                    "data": {"train_path": str(_records(tmp_path / "hundred.jsonl", 100)), "batch_size": 128}}, tune=True)
    space = load_search_space(space_file, cfg)
    check_data(cfg, space)  # 80 training records: 64 fits; the config's 128 never runs
    cfg["data"]["train_path"] = str(_records(tmp_path / "ten.jsonl", 10))
    with pytest.raises(UserError, match=r"the search space \(.*space.yaml\) reaches 64, which is larger than the 8 training records"):
        check_data(cfg, space)
