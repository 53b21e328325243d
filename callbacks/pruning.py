"""Optuna pruning for evaluations that happen mid-epoch, at step = examples seen.

optuna-integration's PyTorchLightningPruningCallback reports at `step=trainer.current_epoch`.
We evaluate every N optimizer steps inside one long epoch, so all of a trial's reports would land
on step 0 (Optuna keeps the first and ignores the rest) and ASHA would never see progress. The
resource here is examples seen, which also puts trials with different batch sizes on one axis.

How a prune ends the trial: the callback sets `trainer.should_stop` and records the decision,
and the tuner calls `check_pruned()` after `fit` returns, which raises `optuna.TrialPruned`.
Raising from inside a hook would also reach Optuna, but Lightning treats any exception as a
crash: the logger is finalized as "failed" and callbacks get `on_exception` instead of
`on_fit_end`, so the W&B run of every pruned trial would read as failed and the checkpoint
poster could not collect the evaluator's pending results. Stopping normally costs nothing: the
stop takes effect at the next step boundary, as Lightning's EarlyStopping does.

An evaluator metric (`eval/accuracy`) is not in `callback_metrics` at validation end: it
arrives later, from the evaluator process, while training goes on. Then the checkpoint poster
hands each result to `on_evaluator_result`, which reports it at the examples seen of *its own*
checkpoint (not at the step where it arrived), asks the pruner at once, and stops the fit at the
step boundary after a prune. A missing or failed evaluation is reported nowhere: it is missing,
never a zero.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_sft.metrics import evaluator_figure


class OptunaPruning(Callback):
    """Reports `monitor` to `trial` after each evaluation and stops the fit when ASHA prunes it.

    The step is `pl_module.examples_seen` (global over ranks). Only global rank 0 talks to the
    storage; its decision is broadcast so every rank stops together. The other ranks of a
    multi-process trial run in processes of their own with `trial=None`: they never touch the
    study, they only take part in the broadcast.
    """

    def __init__(self, trial: optuna.trial.Trial | None, monitor: str = "eval/loss", *,
                 protected: bool = False, full_examples: int | None = None) -> None:
        self.trial = trial
        self.monitor = monitor
        self.protected = protected
        """Report, and let the pruner record this trial at its rungs, but never stop it (the
        baseline trial: the user's own configuration, run in full)."""
        self.full_examples = full_examples
        """The trial's full length: a report there ends the trial anyway, so it is never a prune."""
        self.reports: list[tuple[int, float]] = []
        """(examples seen, value) of every report, in order."""
        self.pruned_at: int | None = None
        """Examples seen when the pruner stopped the trial; None while it runs on."""
        self.missing: list[int] = []
        """Examples seen of evaluations whose result never came (evaluator metrics only)."""
        self._warned_missing = False
        self._figure = evaluator_figure(monitor)

    @property
    def late(self) -> bool:
        """Whether the monitored metric comes from the evaluator, after its validation."""
        return self._figure is not None

    @property
    def pruned(self) -> bool:
        return self.pruned_at is not None

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.trial is not None and trainer.is_global_zero:
            # The study's budget counts running trials' progress from the storage.
            self.trial.set_user_attr("examples_seen", int(pl_module.examples_seen))
        if self.late:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            if not self._warned_missing:
                self._warned_missing = True
                available = ", ".join(sorted(trainer.callback_metrics)) or "none"
                rank_zero_warn(f"OptunaPruning: metric {self.monitor!r} was not logged (logged: {available}); this trial cannot be pruned")
            return
        step = int(pl_module.examples_seen)
        value = float(value)
        prune = trainer.is_global_zero and self._report(step, value)
        if trainer.strategy.broadcast(prune, src=0):
            self._stop(trainer, step, value)

    def on_evaluator_result(self, trainer: Trainer, pl_module: LightningModule, result: dict[str, Any]) -> None:
        """A checkpoint's grades came back (on global rank 0, from the checkpoint poster)."""
        if not self.late or self.pruned:
            return
        if result["status"] != "ok" or result.get(self._figure) is None:
            self.missing.append(int(result["examples_seen"]))
            return
        step, value = int(result["examples_seen"]), float(result[self._figure])
        if self._report(step, value):
            # Only rank 0 sees results; StopSync hands the stop to the other ranks.
            self._stop(trainer, step, value)

    def _report(self, step: int, value: float) -> bool:
        """Report `value` at `step`; whether the pruner says stop."""
        if self.trial is None or any(s == step for s, _ in self.reports):
            # A second evaluation at the same examples seen (e.g. one at the end of fit) would
            # make Optuna warn and drop it; it carries no new information anyway.
            return False
        self.trial.report(value, step)
        self.reports.append((step, value))
        prune = self.trial.should_prune()  # asked even when ignored: it records the rung's value
        if self.full_examples is not None and step >= self.full_examples:
            return False
        return prune and not self.protected

    def _stop(self, trainer: Trainer, step: int, value: float) -> None:
        self.pruned_at = step
        trainer.should_stop = True
        shown = f"{value:.4f}" if math.isfinite(value) else str(value)
        name = f"trial {self.trial.number}" if self.trial is not None else "trial"
        rank_zero_info(f"{name} pruned at {step} examples seen ({self.monitor}={shown})")

    def check_pruned(self) -> None:
        """Raise optuna.TrialPruned if the pruner stopped this trial (call after `fit`)."""
        if self.pruned_at is None:
            return
        value = next((v for s, v in self.reports if s == self.pruned_at), float("nan"))
        raise optuna.TrialPruned(f"pruned at {self.pruned_at} examples seen with {self.monitor}={value:.6g}")
