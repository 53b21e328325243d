"""Records the loss curves against examples seen, and the best evaluation (with its weights)."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lit_sft.metrics import evaluator_figure, improves
from lit_sft.weights import snapshot


class History(Callback):
    """Keeps `train/loss` and the monitored metric per step, and the best evaluation.

    The tuner plots these against examples seen and takes a trial's value as its best
    objective, not its last; `keep_best_weights` keeps a CPU copy of the best weights because
    the model object is reused by the next trial. When the monitor is an evaluator figure
    (`eval/accuracy`), its rows and the best come from `on_evaluator_result`, at the step of the
    graded checkpoint; its weights are then the file the checkpoint poster kept, not a snapshot.
    """

    def __init__(self, monitor: str = "eval/loss", mode: str = "min", keep_best_weights: bool = False) -> None:
        self.monitor, self.mode, self.keep_best_weights = monitor, mode, keep_best_weights
        self.rows: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.best_state: dict[str, Any] | None = None
        self._figure = evaluator_figure(monitor)

    def _better(self, value: float) -> bool:
        return improves(value, None if self.best is None else self.best[self.monitor], self.mode)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # .item() syncs the GPU, so only at the logging cadence.
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 and "train/loss" in trainer.callback_metrics:
            loss = float(trainer.callback_metrics["train/loss"])
            self.rows.append({"step": trainer.global_step, "examples_seen": pl_module.examples_seen, "train/loss": loss})

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._figure is not None:
            if "eval/loss" in trainer.callback_metrics:
                self.rows.append({"step": trainer.global_step, "examples_seen": pl_module.examples_seen,
                                  "eval/loss": float(trainer.callback_metrics["eval/loss"])})
            return
        if self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        row = {"step": trainer.global_step, "examples_seen": pl_module.examples_seen, self.monitor: value}
        if "eval/loss" in trainer.callback_metrics:
            row["eval/loss"] = float(trainer.callback_metrics["eval/loss"])
        self.rows.append(row)
        if math.isfinite(value) and self._better(value):
            self.best = row
            if self.keep_best_weights and trainer.is_global_zero:
                self.best_state = snapshot(pl_module.model)

    def on_evaluator_result(self, trainer: Trainer, pl_module: LightningModule, result: dict[str, Any]) -> None:
        """An evaluator metric's value, at the step and examples seen of its own checkpoint."""
        if self._figure is None or result["status"] != "ok" or result.get(self._figure) is None:
            return
        value = float(result[self._figure])
        row = {"step": result["step"], "examples_seen": result["examples_seen"], self.monitor: value}
        self.rows.append(row)
        if self._better(value):
            self.best = row

    def curve(self, key: str) -> list[dict[str, float]]:
        return [r for r in self.rows if key in r]
