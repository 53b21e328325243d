"""Early stopping on a metric the evaluator returns later, and the stop it must share with every rank.

Lightning's EarlyStopping reads its monitor from `callback_metrics` at validation end; an
evaluator figure (`eval/accuracy`) is not there yet. `ResultEarlyStopping` applies the same rule
(patience evaluations without an improvement of more than `min_delta`) to results as they
arrive, counting only evaluations that produced a result: a missing one is not a "no
improvement".
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_sft.metrics import evaluator_figure, improves


class ResultEarlyStopping(Callback):
    """Stops the fit after `patience` evaluator results without an improvement."""

    def __init__(self, monitor: str = "eval/accuracy", mode: str = "max", patience: int = 3, min_delta: float = 0.0) -> None:
        figure = evaluator_figure(monitor)
        if figure is None:
            raise ValueError(f"{monitor!r} is not an evaluator metric; use Lightning's EarlyStopping")
        self.monitor, self.figure, self.mode = monitor, figure, mode
        self.patience, self.min_delta = int(patience), abs(float(min_delta))
        self.best: float | None = None
        self.wait_count = 0
        self.stopped_at: int | None = None
        """Examples seen of the result that stopped the run."""

    def on_evaluator_result(self, trainer: Trainer, pl_module: LightningModule, result: dict[str, Any]) -> None:
        if self.stopped_at is not None or result["status"] != "ok" or result.get(self.figure) is None:
            return
        value = float(result[self.figure])
        if improves(value, self.best, self.mode, self.min_delta):
            self.best, self.wait_count = value, 0
            return
        self.wait_count += 1
        if self.wait_count >= self.patience:
            self.stopped_at = int(result["examples_seen"])
            trainer.should_stop = True
            rank_zero_info(f"{self.monitor} did not improve in the last {self.wait_count} evaluations "
                           f"(best {self.best:.4f}): stopping at the next step")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait_count": self.wait_count, "stopped_at": self.stopped_at}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.wait_count, self.stopped_at = state_dict["best"], state_dict["wait_count"], state_dict["stopped_at"]


class StopSync(Callback):
    """Hands a stop that rank 0 decided from an evaluator result to every rank, at the same step.

    Results reach rank 0 only. A rank that stopped alone would leave the others waiting in the
    next step's gradient all-reduce; so at the end of every step all ranks take rank 0's
    decision. Placed after the checkpoint poster (which collects the results) in the callback
    list, so the step that received a prune also ends it. One small broadcast per step, only in
    multi-process runs whose objective comes from the evaluator.
    """

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.world_size > 1:
            trainer.should_stop = bool(trainer.strategy.broadcast(bool(trainer.should_stop), src=0))
