"""Small configs for tests: the tiny model, a handful of generated records, no W&B, no evaluator."""

from __future__ import annotations

from typing import Any


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
