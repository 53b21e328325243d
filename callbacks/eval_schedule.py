"""Evaluations at chosen optimizer steps, beside Lightning's regular `val_check_interval`.

ASHA compares trials at rungs of examples seen. Evaluating every `val_check_interval` steps, a
batch-64 trial meets a 4,000-example rung at its next regular evaluation (4,096 with an
evaluation every 2,048), 1.5 batches late; the first step at or past the rung is 4,032. The
tuner asks for an evaluation at that step, so every batch size is judged as close to the rung as
its batches allow.

Lightning has no public hook for "validate now" inside the training epoch, so the epoch loop's
own decision (`_should_check_val_fx`) is widened for the fit: it still runs every regular
evaluation, and also one after each chosen step.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class EvaluateAtSteps(Callback):
    """Run validation after each optimizer step in `steps`, as well as at the regular interval."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = frozenset(int(s) for s in steps)
        self._restore: Any = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        regular = loop._should_check_val_fx

        def should_check(data_fetcher: Any) -> bool:
            # Called once per batch after its optimizer step, so global_step counts it.
            if regular(data_fetcher):
                return True
            return trainer.global_step in self.steps and loop._should_check_val_epoch()

        loop._should_check_val_fx = should_check
        self._restore = (loop, regular)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._undo()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._undo()

    def _undo(self) -> None:
        if self._restore is not None:
            loop, regular = self._restore
            loop._should_check_val_fx = regular
            self._restore = None
