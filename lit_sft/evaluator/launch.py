"""Starting the evaluator from a config: shared by train() and the tuner."""

from __future__ import annotations

from typing import Any

from lit_sft.devices import evaluator_device, train_device


def start_evaluator(cfg: dict[str, Any]):
    """A started EvaluatorClient for a run or a whole study (it loads the model once), or None."""
    if not cfg["evaluator"]["enabled"]:
        return None
    from lit_sft.data import SFTDataModule
    from lit_sft.evaluator.client import EvaluatorClient
    from lit_sft.evaluator.config import EvaluatorConfig

    # validation_problems is computed without tokenizing the training data.
    problems = SFTDataModule(**cfg["data"]).validation_problems
    config = EvaluatorConfig(**{**cfg["evaluator"], "device": evaluator_device(cfg)})
    client = EvaluatorClient(cfg["model"]["model_name_or_path"], problems, config, train_device=train_device(cfg["trainer"]))
    client.start()
    return client
