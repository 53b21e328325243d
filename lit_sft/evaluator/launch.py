"""Starting the evaluator from a config: shared by train(), the tuner and its final test."""

from __future__ import annotations

from typing import Any

from lit_sft.devices import train_device


def start_evaluator(cfg: dict[str, Any], *, problems: list | None = None, model_path: str | None = None):
    """A started evaluator client for a run or a whole study (it loads the model once), or None.

    `problems` and `model_path` default to the validation problems and the model trained from;
    the final test passes the test problems and the best model's folder. With
    `evaluator.address` the client posts to that shared server (`start_remote`) instead.
    """
    if not cfg["evaluator"]["enabled"]:
        return None
    from lit_sft.data import SFTDataModule

    if problems is None:
        # validation_problems is computed without tokenizing the training data.
        problems = SFTDataModule(**cfg["data"]).validation_problems
    if cfg["evaluator"].get("address"):
        return start_remote(cfg, problems, test=model_path is not None)
    from lit_sft.evaluator.client import EvaluatorClient
    from lit_sft.evaluator.config import EvaluatorConfig, place

    placement = place(cfg)
    values = {**cfg["evaluator"], "device": placement.device, "backend": placement.backend}
    if model_path is not None:
        values["num_problems"] = len(problems)
    config = EvaluatorConfig(**values)
    client = EvaluatorClient(model_path or cfg["model"]["model_name_or_path"], problems, config, train_device=train_device(cfg["trainer"]))
    client.start()
    return client


def start_remote(cfg: dict[str, Any], problems: list, *, test: bool = False, name: str | None = None):
    """A connected RemoteEvaluatorClient: the trials' checkpoints on the validation problems, or
    (`test`) the final test's best model on the test problems, whose file the server must keep.

    The server holds the model trained from; the final test posts the best model's weights file,
    which the engine swaps in like any checkpoint. `name`: how the server's log and status show
    this client (default HOST:PID).
    """
    from lit_sft.evaluator.keys import load_key
    from lit_sft.evaluator.remote import RemoteEvaluatorClient
    from lit_sft.weights import resolve_model_path

    evaluator = cfg["evaluator"]
    chosen = list(problems) if test else list(problems)[: int(evaluator["num_problems"])]
    client = RemoteEvaluatorClient(
        str(evaluator["address"]),
        load_key(evaluator.get("key_file")),
        resolve_model_path(cfg["model"]["model_name_or_path"]),
        [(p.prompt, p.answer) for p in chosen],
        problem_set="test" if test else "validation",
        max_new_tokens=int(evaluator["max_new_tokens"]),
        connect_timeout_s=float(evaluator.get("connect_timeout_s", 60.0)),
        delete_files=not test,
        name=name,
    )
    client.start()
    return client
