"""Small configs for tests: the tiny model, a handful of generated records, no W&B, no evaluator."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch import Callback


def small_cfg(model_path: str, tmp_path, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "model": {"model_name_or_path": model_path, "learning_rate": 1e-3},
        "data": {"num_generated": 160, "batch_size": 8, "eval_size": 16, "num_validation_problems": 8, "max_length": 128},
        "trainer": {"max_steps": 4, "val_check_interval": 2, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
        "evaluator": {"enabled": False},
        "wandb": {"enabled": False},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def study_cfg(model_path: str, tmp_path: Path, space: str, name: str, study: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    """A small study: 6 steps per trial, an evaluation every 2 (16, 32, 48 examples at batch 8)."""
    space_path = tmp_path / "space.yaml"
    space_path.write_text(space)
    cfg = small_cfg(model_path, tmp_path, trainer={"max_steps": 6, "val_check_interval": 2}, **sections)
    cfg["study"] = {
        "n_trials": 2, "name": name, "results_dir": str(tmp_path / "results"), "search_space": str(space_path),
        "plots": False, "save_best_model": False, "heartbeat_interval_s": None,
        "sampler": {"n_startup_trials": 2}, "pruner": {"enabled": False}, **(study or {}),
    }
    return cfg


class RaiseAtSecondBatch(Callback):
    """Raises `error` as the second training batch starts: a crash or Ctrl-C mid-trial."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            raise self.error


def sqlite_url(results_dir: Path) -> str:
    """The study storage the tuner defaults to under `results_dir`."""
    return f"sqlite:///{(Path(results_dir) / 'optuna.db').resolve()}"


def wrap_train(monkeypatch, per_trial: dict[int, list[Callback]]) -> list[dict[str, Any]]:
    """Run the real train() with extra callbacks for some trials; return its calls' kwargs."""
    from lit_sft import training
    from lit_sft.study import objective

    real = training.train
    calls: list[dict[str, Any]] = []

    def wrapped(cfg, **kwargs):
        number = kwargs["callbacks"][0].trial.number
        calls.append({"number": number, "cfg": cfg, **kwargs})
        kwargs["callbacks"] = [*kwargs["callbacks"], *per_trial.get(number, [])]
        return real(cfg, **kwargs)

    monkeypatch.setattr(objective, "train", wrapped)
    return calls


def tune_interrupted(cfg: dict[str, Any]) -> None:
    """Run the study, expecting a Ctrl-C to end it (a RaiseAtSecondBatch(KeyboardInterrupt()))."""
    from lit_sft.study import run

    try:
        with pytest.raises(KeyboardInterrupt):
            run.tune(cfg)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning leaves Ctrl-C ignored
