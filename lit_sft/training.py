"""train(cfg) -> metrics: one SFT run from a config dict. train.py and the tuner both call it."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping

from callbacks.history import History
from lit_sft.config import apply_budget, complete
from lit_sft.available import has_module
from lit_sft.data import SFTDataModule
from lit_sft.evaluator.launch import start_evaluator
from lit_sft.module import SFTModule

log = logging.getLogger(__name__)


def make_logger(wandb_cfg: dict[str, Any], run_name: str | None, params: dict[str, Any]):
    """A W&B logger (offline unless configured), or False when disabled."""
    if not wandb_cfg.get("enabled", True) or wandb_cfg.get("mode") == "disabled":
        return False
    from lightning.pytorch.loggers import WandbLogger

    save_dir = Path(wandb_cfg["save_dir"])
    save_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        project=wandb_cfg["project"], entity=wandb_cfg.get("entity"), group=wandb_cfg.get("group"),
        name=run_name or wandb_cfg.get("name"), tags=wandb_cfg.get("tags"), save_dir=str(save_dir),
        mode=wandb_cfg["mode"], config=params, reinit="create_new",
    )


def _finish_logger(logger: Any) -> None:
    if logger and hasattr(logger, "experiment"):
        try:
            logger.experiment.finish()
        except Exception as err:  # a logging hiccup must not lose the run's results
            log.warning("W&B finish failed: %s", err)


def _trainer_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    kwargs = {k: v for k, v in cfg["trainer"].items() if v is not None or k in ("check_val_every_n_epoch",)}
    if kwargs.get("precision") is None:
        # bf16 on GPU (halves activation memory, full-rate tensor cores); fp32 on CPU.
        kwargs["precision"] = "bf16-mixed" if torch.cuda.is_available() and kwargs.get("accelerator") != "cpu" else "32-true"
    kwargs.setdefault("default_root_dir", cfg["output_dir"])
    return kwargs


def _callbacks(cfg: dict[str, Any], history: History) -> list[Callback]:
    out: list[Callback] = [history]
    if cfg["trainer"].get("enable_progress_bar", True) is not False and has_module("rich"):
        from callbacks.progress import StepProgressBar

        out.append(StepProgressBar(leave=False))
    stop = cfg["early_stopping"]
    if stop["enabled"]:
        out.append(EarlyStopping(monitor=stop["monitor"], mode=stop["mode"], patience=stop["patience"], min_delta=stop["min_delta"]))
    return out


def _share_cpu_with(evaluator: Any, trainer: Trainer) -> None:
    """Leave the evaluator its half of the cores when both run on the CPU.

    Oversubscribed cores make both sides crawl (measured: 27 tiny-model steps took 0.2 s with
    one training thread beside the evaluator, 16.8 s with two).
    """
    if evaluator is None or getattr(evaluator, "device", None) != "cpu" or trainer.strategy.root_device.type != "cpu":
        return
    cores = os.cpu_count() or 2
    torch.set_num_threads(max(1, cores - cores // 2))


def _result(history: History, model: SFTModule, trainer: Trainer, evaluations: list[dict], seconds: float) -> dict[str, Any]:
    metrics = trainer.callback_metrics
    best = history.best or {}
    result: dict[str, Any] = {
        "eval/loss": best.get("eval/loss", float("nan")),
        "objective": best.get(history.monitor, float("nan")),
        "eval/loss_last": float(metrics["eval/loss"]) if "eval/loss" in metrics else float("nan"),
        "train/loss": float(metrics["train/loss"]) if "train/loss" in metrics else float("nan"),
        "best_step": best.get("step"),
        "best_examples_seen": best.get("examples_seen"),
        "global_step": trainer.global_step,
        "examples_seen": model.examples_seen,
        "stopped_early": bool(trainer.should_stop and trainer.global_step < (trainer.max_steps or 0)),
        "seconds": seconds,
        "evaluations": evaluations,
        "history": history.rows,
    }
    result.update(_accuracy_at(evaluations, best.get("step")))
    return result


def _accuracy_at(evaluations: list[dict], step: int | None) -> dict[str, Any]:
    """Accuracy figures of the evaluation at the best step (the latest good one if none there)."""
    good = [e for e in evaluations if e.get("status") == "ok"]
    if not good:
        return {}
    chosen = next((e for e in good if e["step"] == step), None) or max(good, key=lambda e: e["step"])
    keys = ("accuracy", "format_accuracy", "correct", "wrong_answer", "format_failure", "mean_response_length")
    out = {f"eval/{k}": chosen[k] for k in keys if k in chosen}
    out["accuracy_step"] = chosen["step"]
    out["best_accuracy"] = max(e["accuracy"] for e in good)
    return out


def train(
    cfg: dict[str, Any],
    *,
    callbacks: Sequence[Callback] = (),
    evaluator: Any = None,
    run_name: str | None = None,
    keep_best_weights: bool = False,
    logger_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fine-tune once with `cfg` (a parsed config, possibly partial) and return its metrics.

    `evaluator`: a started EvaluatorClient to reuse (the tuner's, one per study); when None and
    `cfg["evaluator"]["enabled"]`, one is started for this run and stopped at its end.
    """
    cfg = apply_budget(complete(cfg, tune="study" in cfg))
    pl.seed_everything(cfg["seed_everything"], workers=True, verbose=False)
    model = SFTModule(**cfg["model"])
    data_kwargs = dict(cfg["data"])
    data_kwargs["tokenizer_name_or_path"] = data_kwargs.get("tokenizer_name_or_path") or model.model_path
    data = SFTDataModule(**data_kwargs)
    stop = cfg["early_stopping"]
    history = History(monitor=stop["monitor"], mode=stop["mode"], keep_best_weights=keep_best_weights)
    all_callbacks = _callbacks(cfg, history) + list(callbacks)
    params = logger_params if logger_params is not None else {k: cfg[k] for k in ("model", "data", "trainer")}
    logger = make_logger(cfg["wandb"], run_name, params)
    trainer = Trainer(**_trainer_kwargs(cfg), callbacks=all_callbacks, logger=logger)
    own_evaluator = evaluator is None and cfg["evaluator"]["enabled"]
    poster = None
    threads = torch.get_num_threads()
    try:
        if own_evaluator:
            evaluator = start_evaluator(cfg)
        if evaluator is not None:
            from callbacks.checkpoint_poster import CheckpointPoster

            weights_dir = Path(cfg["output_dir"]) / "weights" / (run_name or "run")
            poster = CheckpointPoster(evaluator, run_name or "run", weights_dir, final_wait_s=cfg["evaluator"]["final_wait_s"])
            trainer.callbacks.append(poster)
        _share_cpu_with(evaluator, trainer)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
        _finish_logger(logger)
        if own_evaluator and evaluator is not None:
            evaluator.stop()
    if history.best is None and trainer.global_step > 0:
        log.warning("no evaluation ran: trainer.val_check_interval=%s > steps run=%d", cfg["trainer"]["val_check_interval"], trainer.global_step)
    result = _result(history, model, trainer, list(poster.results) if poster else [], seconds)
    if poster is not None:
        result["evaluator_blocked_s"] = poster.blocked_s
    result["data"] = {"examples": data.stats.examples, "truncated": data.stats.truncated, "dropped": data.stats.dropped, "filtered_wrong": data.stats.filtered_wrong}
    if keep_best_weights:
        result["best_state"] = history.best_state
    result["model"] = model.model
    result["tokenizer"] = data.tokenizer
    return result


def save_pretrained(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Save the run's best weights (or its final ones) with its tokenizer, `from_pretrained`-ready."""
    from lit_sft.weights import restore, snapshot

    out_dir = Path(out_dir)
    model = result["model"]
    state = result.get("best_state")
    current = snapshot(model) if state is not None else None
    try:
        if state is not None:
            restore(model, state)
        model.save_pretrained(out_dir)
        result["tokenizer"].save_pretrained(out_dir)
    finally:
        if current is not None:
            restore(model, current)
    return out_dir

