"""CheckpointPoster: hands each validated checkpoint to the evaluator and logs its accuracy later.

Writing the weights is the only work done in the training loop; generation and grading happen
in the evaluator process, and their results are picked up (never waited for) at the next train
batch and logged at the step they belong to. Only the end of the run waits, and only up to
`final_wait_s`.

Other callbacks that act on the evaluator's figures (pruning, early stopping, the history of a
run whose objective is `eval/accuracy`) implement `on_evaluator_result(trainer, pl_module,
result)`; train() registers them here and each result reaches them as it arrives, carrying the
step and examples seen of its own checkpoint. With `keep_best`, the weights file of the best
result so far stays on disk until the fit ends (it becomes the run's best model); every other
file is deleted once its result is in, as before.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lit_sft.evaluator.client import EvaluatorClient, EvaluatorWarning
from lit_sft.evaluator.worker import blank_result
from lit_sft.metrics import EVALUATOR_FIGURES, improves
from lit_sft.weights import save_weights

ResultListener = Callable[[Trainer, LightningModule, dict[str, Any]], None]


class CheckpointPoster(Callback):
    """After each validation, save the weights and post them to the evaluator; log results."""

    def __init__(
        self,
        client: EvaluatorClient,
        run_id: str,
        weights_dir: str | Path,
        final_wait_s: float = 120.0,
        keep_best: tuple[str, str] | None = None,
    ) -> None:
        """
        Args:
            keep_best: (figure, mode), e.g. ("accuracy", "max"): keep the weights file of the
                best result by that figure until the fit ends, in `best_path`.
        """
        self.client = client
        self.run_id = str(run_id)
        self.weights_dir = Path(weights_dir)
        self.final_wait_s = float(final_wait_s)
        self.results: list[dict[str, Any]] = []
        """Every evaluation of this run (ok, error, missing), in step order once the fit ended."""
        self.received_at_step: dict[int, int] = {}
        """Job id -> trainer.global_step when its result was picked up (shows training went on)."""
        self.blocked: dict[str, float] = {"post": 0.0, "poll": 0.0, "final_wait": 0.0}
        """Seconds spent inside this callback's hooks, by kind: writing and posting weights,
        polling for results, the bounded wait at the end. What the evaluator costs training."""
        self.listeners: list[ResultListener] = []
        """Called with every result (ok, error, missing) as it is collected."""
        self.keep_best = keep_best
        self.best_result: dict[str, Any] | None = None
        self.best_path: Path | None = None
        """The kept weights file of `best_result` (with `keep_best`); the caller deletes it."""
        self._pending: dict[int, dict[str, Any]] = {}
        self._warned: set[str] = set()
        self._posted_steps: set[int] = set()
        self._done = False
        self._closed = False

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            with self._timed("post"):
                self._done = False
                self._closed = False
                self.client.start()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Only fit's validations: a stand-alone `trainer.validate()` has no fit end to clean up.
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != TrainerFn.FITTING:
            return
        step = trainer.global_step
        if step in self._posted_steps:
            return  # a second validation at the same step (e.g. at the end of fit) adds nothing
        if self._closed:
            # A result already stopped the run (pruned, or no longer improving): Lightning runs
            # one more validation when a stop is requested mid-interval; its grade decides nothing.
            return
        with self._timed("post"):
            path = save_weights(pl_module.model, self._path(step))
            examples_seen = int(getattr(pl_module, "examples_seen", 0))
            job = self.client.post(self.run_id, step, examples_seen, str(path))
            self._pending[job] = {"job": job, "run": self.run_id, "step": step, "examples_seen": examples_seen, "path": str(path)}
            self._posted_steps.add(step)
            self._collect(trainer, pl_module, self.client.poll())

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.is_global_zero and self._pending:
            with self._timed("poll"):
                self._collect(trainer, pl_module, self.client.poll())

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._finish(trainer, pl_module, self.final_wait_s)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            # Ctrl-C means "stop now": collect what is already there, wait for nothing.
            self._finish(trainer, pl_module, 0.0 if isinstance(exception, KeyboardInterrupt) else self.final_wait_s)

    # -- internals -------------------------------------------------------------------------------

    @property
    def blocked_s(self) -> float:
        """Total seconds the training loop spent in this callback."""
        return sum(self.blocked.values())

    @contextmanager
    def _timed(self, kind: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.blocked[kind] += time.perf_counter() - start

    def _path(self, step: int) -> Path:
        safe_run = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.run_id)
        return self.weights_dir / f"{safe_run}-step{step:08d}.safetensors"

    def _collect(self, trainer: Trainer, pl_module: LightningModule, results: list[dict[str, Any]]) -> None:
        for result in results:
            job = self._pending.pop(result["job"], None)
            if job is None:
                continue  # a job of an earlier run sharing this evaluator, given up on there
            # The evaluator has read the file before answering; a 1.5B model's weights take 3 GB.
            self._keep_or_delete(result, Path(job["path"]))
            self.received_at_step[result["job"]] = trainer.global_step
            self.results.append(result)
            if result["status"] == "ok":
                self._log(trainer, result)
            elif result["status"] == "error" and result["error"] not in self._warned:
                # One warning per distinct cause: an evaluator that cannot start answers every
                # post with the same error.
                self._warned.add(result["error"])
                warnings.warn(
                    f"evaluation of run {self.run_id} at step {result['step']} failed: {result['error']}",
                    EvaluatorWarning,
                    stacklevel=2,
                )
            # "missing" results were announced once by the client when its worker died.
            for listener in self.listeners:
                listener(trainer, pl_module, result)
            if trainer.should_stop:
                self._closed = True

    def _keep_or_delete(self, result: dict[str, Any], path: Path) -> None:
        """Delete the file unless it holds the best result so far (then delete the old best)."""
        if self.keep_best is not None and result["status"] == "ok":
            figure, mode = self.keep_best
            best = None if self.best_result is None else float(self.best_result[figure])
            if improves(float(result[figure]), best, "min" if mode == "min" else "max"):
                if self.best_path is not None:
                    self._delete(self.best_path)
                self.best_result, self.best_path = result, path
                return
        self._delete(path)

    @staticmethod
    def _log(trainer: Trainer, result: dict[str, Any]) -> None:
        metrics = {f"eval/{name}": float(result[name]) for name in EVALUATOR_FIGURES}
        for logger in trainer.loggers:
            # The result's own step, not the current one: the figures describe that checkpoint.
            # W&B refuses a `step=` lower than its current step, but Lightning's WandbLogger sends
            # the step as the `trainer/global_step` metric (its defined x-axis) and lets W&B
            # number its own rows, so a late result still lands at the right place.
            logger.log_metrics(metrics, step=result["step"])

    def _finish(self, trainer: Trainer, pl_module: LightningModule, wait_s: float) -> None:
        """Wait (bounded) for the evaluations still in flight, record the rest as missing."""
        if self._done:
            return
        self._done = True
        with self._timed("final_wait"):
            if self._pending:
                self._collect(trainer, pl_module, self.client.wait(wait_s, jobs=list(self._pending)))
            if self._pending:
                self.client.cancel(list(self._pending))
                warnings.warn(
                    f"{len(self._pending)} evaluation(s) of run {self.run_id} did not finish within "
                    f"{wait_s:g} s after training; recorded as missing",
                    EvaluatorWarning,
                    stacklevel=2,
                )
                jobs, self._pending = list(self._pending.values()), {}
                for job in jobs:
                    missing = blank_result(job, "missing", f"no result within the final wait of {wait_s:g} s")
                    self.results.append(missing)
                    self._delete(Path(job["path"]))
                    for listener in self.listeners:
                        listener(trainer, pl_module, missing)
            self.results.sort(key=lambda r: (r["step"], r["job"]))
            try:
                self.weights_dir.rmdir()  # only if empty: other files there are not ours
            except OSError:
                pass

    @staticmethod
    def _delete(path: Path) -> None:
        path.unlink(missing_ok=True)
