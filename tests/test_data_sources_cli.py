"""train.py fit on data where users keep it: a Parquet file to train on, validation problems from a
save_to_disk folder, and bad input (a bad Parquet row, a config problem beside a data problem) as
one line with exit code 2 before a model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lit_sft.synthetic import make_problems, make_sft_records

datasets = pytest.importorskip("datasets")
ROOT = Path(__file__).resolve().parents[1]


def _argv(model_path: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/sft.yaml"),
        "--model.model_name_or_path", model_path, "--output_dir", str(tmp_path / "out"),
        "--data.eval_size", "16", "--data.batch_size", "8", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--trainer.enable_progress_bar", "false", "--wandb.enabled", "false", *extra,
    ]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_train_on_parquet_and_grade_on_a_save_to_disk_folder(tiny_model_path, tmp_path):
    train = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(make_sft_records(120, 0)).to_parquet(str(train))
    val = datasets.Dataset.from_list(make_problems(12, 1))
    datasets.DatasetDict(train=datasets.Dataset.from_list(make_problems(5, 2, split="test")), validation=val).save_to_disk(str(tmp_path / "problems"))
    proc = _run(_argv(tiny_model_path, tmp_path, "--data.train_path", str(train), "--data.validation_path", str(tmp_path / "problems"),
                      "--data.num_validation_problems", "12", "--evaluator.max_new_tokens", "8", "--evaluator.final_wait_s", "120"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = dict(line.strip().split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert shown["global_step"] == "4" and shown["examples_seen"] == "32"
    assert 0.0 <= float(shown["eval/accuracy"]) <= 1.0  # graded on the folder's validation split
    assert (tmp_path / "out/run-000/best_model/config.json").is_file()


def test_a_bad_parquet_row_is_one_line_naming_file_and_row(tiny_model_path, tmp_path):
    records = make_sft_records(40, 0)
    records[7]["response"] = None
    path = tmp_path / "sft.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(path))
    proc = _run(_argv(tiny_model_path, tmp_path, "--data.train_path", str(path), "--evaluator.enabled", "false"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {path}, row 7: column 'response' is null (schema prompt_response)"]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_a_config_problem_and_a_data_problem_in_one_run(tiny_model_path, tmp_path):
    """Issue 20, item 5: both at once, not one per run."""
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": 3}\n')
    proc = _run(_argv(tiny_model_path, tmp_path, "--data.train_path", str(broken), "--trainer.max_steps", "2",
                      "--trainer.val_check_interval", "25", "--evaluator.enabled", "false"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: trainer.val_check_interval (25 steps) > trainer.max_steps (2)")
    assert line.endswith(f"; {broken}:2: field 'response' must be a string, got a number (schema prompt_response)")
