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
from lit_sft.available import has_module
from lit_sft.config import apply_budget, check, complete, eval_steps
from lit_sft.data import SFTDataModule
from lit_sft.evaluator.launch import start_evaluator
from lit_sft.evaluator.remote import check_server
from lit_sft.failures import describe
from lit_sft.metrics import EVALUATOR_FIGURES, evaluator_figure
from lit_sft.module import SFTModule
from lit_sft.stats import accuracy_interval
from lit_sft.wandb_run import best_summary, finish, make_logger

log = logging.getLogger(__name__)


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
    steps = eval_steps(cfg)
    if steps:
        from callbacks.eval_schedule import EvaluateAtSteps

        out.append(EvaluateAtSteps(steps))
    if cfg["trainer"].get("enable_model_summary", True) is not False:
        from callbacks.model_summary import model_summary

        out.append(model_summary())
    stop = cfg["early_stopping"]
    if stop["enabled"] and evaluator_figure(stop["monitor"]) is not None:
        from callbacks.late_metrics import ResultEarlyStopping

        out.append(ResultEarlyStopping(monitor=stop["monitor"], mode=stop["mode"], patience=stop["patience"], min_delta=stop["min_delta"]))
    elif stop["enabled"]:
        out.append(EarlyStopping(monitor=stop["monitor"], mode=stop["mode"], patience=stop["patience"], min_delta=stop["min_delta"]))
    return out


def _poster(cfg: dict[str, Any], evaluator: Any, run_name: str | None, keep_best_weights: bool) -> list[Callback]:
    """The checkpoint poster (with an evaluator), then the stop sync when results decide stops."""
    from callbacks.checkpoint_poster import CheckpointPoster
    from callbacks.late_metrics import StopSync

    stop = cfg["early_stopping"]
    figure = evaluator_figure(stop["monitor"])
    sync = [StopSync()] if figure is not None else []  # every rank has one; only rank 0 a poster
    if evaluator is None:
        return sync
    keep = (figure, stop["mode"]) if figure is not None and keep_best_weights else None
    weights_dir = Path(cfg["output_dir"]) / "weights" / (run_name or "run")
    poster = CheckpointPoster(evaluator, run_name or "run", weights_dir, final_wait_s=cfg["evaluator"]["final_wait_s"], keep_best=keep)
    return [poster, *sync]


def _listen(trainer: Trainer) -> None:
    """Register every callback that acts on evaluator results with the checkpoint poster."""
    from callbacks.checkpoint_poster import CheckpointPoster

    posters = [c for c in trainer.callbacks if isinstance(c, CheckpointPoster)]
    for poster in posters:
        poster.listeners.extend(c.on_evaluator_result for c in trainer.callbacks if hasattr(c, "on_evaluator_result"))


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
    # Under an evaluator objective the best row holds the grade; its eval/loss is its step's.
    loss_at_best = next((r["eval/loss"] for r in history.rows if "eval/loss" in r and r["step"] == best.get("step")), float("nan"))
    result: dict[str, Any] = {
        "eval/loss": best.get("eval/loss", loss_at_best),
        "objective": best.get(history.monitor, float("nan")),
        "eval/loss_last": float(metrics["eval/loss"]) if "eval/loss" in metrics else float("nan"),
        "train/loss": float(metrics["train/loss"]) if "train/loss" in metrics else float("nan"),
        "best_step": best.get("step"),
        "best_examples_seen": best.get("examples_seen"),
        "global_step": trainer.global_step,
        "examples_seen": model.examples_seen,
        "max_steps": trainer.max_steps,
        # A pruned trial stops the same way; early stopping did not decide that.
        "stopped_early": bool(trainer.should_stop and trainer.global_step < (trainer.max_steps or 0) and not _pruned(trainer)),
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
    out = {f"eval/{k}": chosen[k] for k in EVALUATOR_FIGURES if k in chosen}
    out["accuracy_step"] = chosen["step"]
    out["accuracy_n"] = chosen.get("num_problems")
    interval = accuracy_interval(chosen.get("correct"), chosen.get("num_problems"))
    if interval is not None:
        out["accuracy_ci"] = [round(interval[0], 4), round(interval[1], 4)]
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
    other_rank: bool = False,
) -> dict[str, Any]:
    """Fine-tune once with `cfg` (a parsed config, possibly partial) and return its metrics.

    `evaluator`: a started EvaluatorClient to reuse (the tuner's, one per study); when None and
    `cfg["evaluator"]["enabled"]`, one is started for this run and stopped at its end.
    `other_rank`: this process is a rank > 0 of a multi-process trial; rank 0 has the evaluator,
    and stops that its results decide reach this rank through StopSync.
    """
    cfg = complete(cfg, tune="study" in cfg)
    check(cfg, other_rank=other_rank)  # before the model loads or a W&B run exists
    if evaluator is None and not other_rank:
        check_server(cfg)  # with evaluator.address: it answers, takes our key, grades our problems
    cfg = apply_budget(cfg)
    pl.seed_everything(cfg["seed_everything"], workers=True, verbose=False)
    model = SFTModule(**cfg["model"])
    data_kwargs = dict(cfg["data"])
    data_kwargs["tokenizer_name_or_path"] = data_kwargs.get("tokenizer_name_or_path") or model.model_path
    data = SFTDataModule(**data_kwargs)
    stop = cfg["early_stopping"]
    history = History(monitor=stop["monitor"], mode=stop["mode"], keep_best_weights=keep_best_weights and evaluator_figure(stop["monitor"]) is None)
    # The run's W&B config is what runs: every section, after the budget, plus the caller's additions.
    params = {**{k: v for k, v in cfg.items() if k != "study"}, **(logger_params or {})}
    own_evaluator = evaluator is None and cfg["evaluator"]["enabled"]
    poster = None
    logger = None
    threads = torch.get_num_threads()
    try:
        if own_evaluator:
            evaluator = start_evaluator(cfg)
        posting = _poster(cfg, evaluator, run_name, keep_best_weights)
        poster = posting[0] if evaluator is not None else None
        logger = make_logger(cfg["wandb"], run_name, params)
        # The poster before the caller's callbacks: a result it collects at the end of a step
        # reaches pruning and early stopping within that same step.
        trainer = Trainer(**_trainer_kwargs(cfg), callbacks=_callbacks(cfg, history) + posting + list(callbacks), logger=logger)
        _listen(trainer)
        _share_cpu_with(evaluator, trainer)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
    except BaseException as err:
        finish(logger, {"failure": describe(err)}, "failed")
        raise
    finally:
        torch.set_num_threads(threads)
        if own_evaluator and evaluator is not None:
            evaluator.stop()
        _remove_if_empty(Path(cfg["output_dir"]) / "weights")  # the poster removed its run's folder in it
    result = _result(history, model, trainer, list(poster.results) if poster else [], seconds)
    state, note = _state(trainer, result, stop["monitor"])
    finish(logger, {**best_summary(result), **note}, state)
    result["batch_size"] = int(data.hparams.batch_size)
    if poster is not None:
        result["evaluator_blocked_s"] = poster.blocked_s
        result["evaluator_blocked"] = dict(poster.blocked)  # by kind: post, poll, final_wait
        result["poster_received_at_step"] = dict(poster.received_at_step)
    result["data"] = {"examples": data.stats.examples, "truncated": data.stats.truncated, "dropped": data.stats.dropped, "filtered_wrong": data.stats.filtered_wrong}
    if keep_best_weights:
        result["best_state"] = history.best_state if poster is None or poster.keep_best is None else _kept_state(model, poster)
    result["model"] = model.model
    result["tokenizer"] = data.tokenizer
    return result


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # absent, or holding files that are not this run's


def _pruned(trainer: Trainer) -> list[int]:
    """Examples seen where a pruning callback stopped the run (empty: not pruned)."""
    return [c.pruned_at for c in trainer.callbacks if getattr(c, "pruned_at", None) is not None]


def _state(trainer: Trainer, result: dict[str, Any], monitor: str) -> tuple[str, dict[str, Any]]:
    """complete, pruned (at how many examples), or failed (no evaluation ran), for W&B."""
    pruned = _pruned(trainer)
    if pruned:
        return "pruned", {"pruned_at": pruned[0]}
    if result["best_step"] is None:
        return "failed", {"failure": f"no evaluation of {monitor} in {trainer.global_step} steps"}
    return "complete", {}


def _kept_state(model: SFTModule, poster: Any) -> dict[str, Any] | None:
    """The best graded checkpoint's weights, read back from the file the poster kept (then deleted)."""
    from lit_sft.weights import read_state

    if poster.best_path is None:
        return None
    try:
        return read_state(model.model, poster.best_path)
    finally:
        poster.best_path.unlink(missing_ok=True)


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """A folder of its own for one train.py run: `<name>-000`, `-001`, ... (created, never reused)."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for number in range(100_000):
        path = root / f"{name}-{number:03d}"
        try:
            path.mkdir()  # atomic: two runs started together never share a folder
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder under {root}")


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

