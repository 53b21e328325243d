"""Starting the evaluator from a config: shared by train(), the tuner and its final test."""

from __future__ import annotations

from typing import Any

from lit_sft.devices import evaluator_device, train_device


def start_evaluator(cfg: dict[str, Any], *, problems: list | None = None, model_path: str | None = None):
    """A started EvaluatorClient for a run or a whole study (it loads the model once), or None.

    `problems` and `model_path` default to the validation problems and the model trained from;
    the final test passes the test problems and the best model's folder.
    """
    if not cfg["evaluator"]["enabled"]:
        return None
    from lit_sft.data import SFTDataModule
    from lit_sft.evaluator.client import EvaluatorClient
    from lit_sft.evaluator.config import EvaluatorConfig

    if problems is None:
        # validation_problems is computed without tokenizing the training data.
        problems = SFTDataModule(**cfg["data"]).validation_problems
    values = {**cfg["evaluator"], "device": evaluator_device(cfg)}
    if model_path is not None:
        values["num_problems"] = len(problems)
    config = EvaluatorConfig(**values)
    client = EvaluatorClient(model_path or cfg["model"]["model_name_or_path"], problems, config, train_device=train_device(cfg["trainer"]))
    client.start()
    return client
