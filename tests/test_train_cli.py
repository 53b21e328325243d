"""train.py fit: runs to completion, overrides take effect, user errors exit 2 without a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import train as train_cli
from lit_sft import training

ROOT = Path(__file__).resolve().parents[1]


def _argv(model_path: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs/sft.yaml"),
        "--model.model_name_or_path", model_path, "--output_dir", str(tmp_path / "out"),
        "--data.num_generated", "200", "--data.eval_size", "16", "--data.batch_size", "8",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--evaluator.enabled", "false", "--wandb.save_dir", str(tmp_path / "wandb"), *extra,
    ]


def test_overrides_reach_the_run_and_the_best_model_is_saved(tiny_model_path, tmp_path, monkeypatch):
    seen = {}
    real_train = training.train

    def spy(cfg, **kw):
        seen.update(cfg=cfg)
        result = real_train(cfg, **kw)
        seen.update(result=result)
        return result

    monkeypatch.setattr(training, "train", spy)
    argv = _argv(tiny_model_path, tmp_path, "--model.learning_rate", "2e-3", "--model.weight_decay", "0.01", "--data.batch_size", "4")
    assert train_cli.main(argv) == 0
    cfg, result = seen["cfg"], seen["result"]
    assert (cfg["model"]["learning_rate"], cfg["model"]["weight_decay"], cfg["data"]["batch_size"]) == (2e-3, 0.01, 4)
    assert result["global_step"] == 4 and result["examples_seen"] == 16  # 4 steps x batch 4
    assert [r["step"] for r in result["history"] if "eval/loss" in r] == [2, 4]
    assert (tmp_path / "out/run-000/best_model/config.json").is_file()  # a folder per run
    assert (tmp_path / "out/run-000/best_model/tokenizer.json").is_file()
    # the W&B run is offline, with the config it trained with
    (run_file,) = (tmp_path / "wandb").rglob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30  # wandb's service process flushes the run file on its own
    while not (b"learning_rate" in run_file.read_bytes() and b"eval/loss" in run_file.read_bytes()):
        assert time.monotonic() < deadline, "the offline W&B run lacks the config or eval/loss"
        time.sleep(0.5)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--data.train_path", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
        (["--model.model_name_or_path", "/no/such/model"], "/no/such/model"),
        (["--model.learning_rat", "1"], "learning_rat"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tiny_model_path, tmp_path, extra, needle):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *_argv(tiny_model_path, tmp_path), *extra], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.slow
def test_default_config_learns_train_loss_falls_and_eval_logged(tmp_path):
    """The embedded default as shipped (cached tiny model, generated data), shortened."""
    argv = ["fit", "--config", str(ROOT / "configs/sft.yaml"), "--output_dir", str(tmp_path / "out"),
            "--trainer.max_steps", "60", "--trainer.val_check_interval", "20", "--trainer.enable_progress_bar", "false",
            "--evaluator.enabled", "false", "--wandb.enabled", "false"]
    seen = {}
    real_train = training.train
    import lit_sft.training as t

    def spy(cfg, **kw):
        seen["result"] = real_train(cfg, **kw)
        return seen["result"]

    t.train = spy
    try:
        assert train_cli.main(argv) == 0
    finally:
        t.train = real_train
    rows = seen["result"]["history"]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    assert [r["step"] for r in rows if "eval/loss" in r] == [20, 40, 60]
