"""EvaluatorClient: the training side of the out-of-process evaluator.

One worker process serves a whole run or study. Posting never blocks (jobs go through a queue
whose feeder thread does the writing) and polling never blocks (results come back on a pipe
that is read only when it has data), so the training loop never waits on generation.

Failure handling: a worker that dies is noticed at the next poll/post (pipe EOF or exit code);
its unanswered jobs come back as `status: "missing"` results, one EvaluatorWarning says so, and
a fresh worker is started with the next post. A worker that cannot start (bad model path, no
memory) is not restarted: its error is the answer to every job.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_any
from typing import TYPE_CHECKING, Any

from lit_sft.errors import UserError
from lit_sft.evaluator import worker
from lit_sft.evaluator.config import EvaluatorConfig, resolve

if TYPE_CHECKING:
    from lit_sft.formats import Problem

# A worker that dies this many times is probably killed by its checkpoints (out of memory, say);
# starting more only repeats the failure.
MAX_RESTARTS = 3
# How long `stop` lets an idle worker exit on its own before terminating it.
_STOP_GRACE_S = 2.0
_KILL_GRACE_S = 2.0
# vLLM sizes its KV cache from the GPU memory free while it starts; on a GPU shared with training
# it must be built first (once per study), so `start` waits for it up to this long.
_SHARED_GPU_READY_TIMEOUT_S = 900.0


class EvaluatorWarning(UserWarning):
    """The evaluator failed (died, could not start); training goes on without those results."""


@dataclass
class _Worker:
    """One incarnation of the worker process and its channels."""

    process: Any
    """The multiprocessing.Process."""
    jobs: Any
    """Queue to the worker (a fresh one per incarnation: a killed reader can leave its lock held)."""
    results: Connection
    """Our end of the result pipe; the worker holds the only write end, so its death reads as EOF."""
    ready: dict[str, Any] | None = None
    """The worker's "ready" message once it has loaded the model."""
    outstanding: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Jobs posted to this incarnation and not yet answered, by job id."""


_LIVE: weakref.WeakSet[EvaluatorClient] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # Runs before multiprocessing's own exit handler (atexit is last-in first-out), so workers
    # get a stop message rather than only a SIGTERM.
    for client in list(_LIVE):
        client.stop()


class StartStop:
    """What both clients (this one and the shared server's) share: `with client:` starts and
    stops it, and `poll`/`wait` collect results the same way over their own channels."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _drain(self) -> None:
        raise NotImplementedError

    def _pending(self) -> dict[int, dict[str, Any]] | None:
        """Jobs posted and not answered, by id; None when there is nothing to wait on."""
        raise NotImplementedError

    def _waitables(self) -> list[Any]:
        """What `multiprocessing.connection.wait` blocks on until a result may have come."""
        raise NotImplementedError

    def poll(self) -> list[dict[str, Any]]:
        """Results finished since the last call (ok, error or missing); never blocks."""
        self._drain()
        out, self._finished = self._finished, []
        return out

    def wait(self, timeout_s: float, jobs: Iterable[int] | None = None) -> list[dict[str, Any]]:
        """Poll until `jobs` (default: every job posted) are answered or `timeout_s` has passed.

        Returns every result that finished meanwhile; jobs still running stay outstanding.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        targets = set(jobs) if jobs is not None else None
        collected = self.poll()
        while (pending := self._pending()) is not None:
            waiting = pending.keys() if targets is None else targets & pending.keys()
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                break
            wait_any(self._waitables(), timeout=remaining)
            collected += self.poll()
        return collected


class EvaluatorClient(StartStop):
    """Starts the evaluator worker, posts checkpoints to it, collects results without blocking."""

    def __init__(
        self,
        model_name_or_path: str | None,
        problems: Sequence[Problem],
        config: EvaluatorConfig,
        train_device: str = "cpu",
    ) -> None:
        from lit_sft.weights import resolve_model_path

        if not problems:
            raise UserError("evaluator: there are no validation problems to evaluate on")
        self.config = config
        self.model_path = resolve_model_path(model_name_or_path)
        placement = resolve(config, train_device)
        self.device = placement.device
        self.train_device = "cuda:0" if train_device == "cuda" else str(train_device)
        self.backend = placement.backend
        self.problems = [(p.prompt, p.answer) for p in list(problems)[: config.num_problems]]
        self._ctx = mp.get_context("spawn")
        self._worker: _Worker | None = None
        self._next_job = 0
        self._cancelled: set[int] = set()
        self._finished: list[dict[str, Any]] = []
        self._fatal: str | None = None
        """Why no worker can serve (start-up failed, or died too often); every job gets it."""
        self._restarts = 0
        self._crashed = False
        """The last worker died unasked: the next post starts a new one (and counts a restart)."""
        self.ready_info: dict[str, Any] | None = None
        """The latest worker's ready message: pid, load_seconds, backend, device."""
        _LIVE.add(self)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the worker unless one is running.

        Returns at once (the model loads in the worker), except for vLLM on the training GPU,
        which is waited for: it must claim its memory before training does.
        """
        if self._worker is not None or self._fatal is not None:
            return
        if self._crashed:
            self._restarts += 1
            self._crashed = False
        spec = worker.WorkerSpec(
            model_path=self.model_path,
            backend=self.backend,
            device=self.device,
            problems=self.problems,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size,
            num_examples=self.config.num_examples,
            grading_timeout_s=self.config.grading_timeout_s,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            kv_cache_memory_bytes=self.config.kv_cache_memory_bytes,
            parent_pid=os.getpid(),
            # On a CPU-only machine training and generation share the cores; half each keeps
            # either from being starved by oversubscription.
            torch_threads=max(1, (os.cpu_count() or 2) // 2) if self.device == "cpu" else None,
        )
        jobs = self._ctx.Queue()
        reader, writer = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=worker.main, args=(spec, jobs, writer), name="lit-sft-evaluator", daemon=True
        )
        process.start()
        writer.close()  # only the worker may hold the write end, or its death never reads as EOF
        self._worker = _Worker(process=process, jobs=jobs, results=reader)
        if self.backend == "vllm" and self.device.startswith("cuda") and self.device == self.train_device:
            self.wait_ready(_SHARED_GPU_READY_TIMEOUT_S)

    @property
    def pid(self) -> int | None:
        """The worker's OS process id (None before start or after stop)."""
        return self._worker.process.pid if self._worker is not None else None

    @property
    def ready(self) -> bool:
        """The current worker has loaded its model."""
        self._drain()
        return self._worker is not None and self._worker.ready is not None

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the worker has loaded its model (e.g. before training takes the GPU)."""
        deadline = time.monotonic() + timeout_s
        while not self.ready and self._worker is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            wait_any([self._worker.results, self._worker.process.sentinel], timeout=remaining)
        return self.ready

    def stop(self) -> None:
        """Stop the worker: a stop message, then SIGTERM, then SIGKILL, each after a short grace.

        Jobs still unanswered come back from the next `poll` as missing. Safe to call twice.
        """
        current = self._worker
        if current is None:
            return
        self._drain()
        current = self._worker
        if current is None:
            return
        self._worker = None
        try:
            current.jobs.put({"kind": "stop"})
        except (OSError, ValueError):
            pass
        process = current.process
        # A worker still loading reads no messages: waiting for it to see "stop" is time lost.
        process.join(_STOP_GRACE_S if current.ready is not None else 0.0)
        if process.is_alive():
            process.terminate()
            process.join(_KILL_GRACE_S)
        if process.is_alive():
            process.kill()
            process.join()
        self._record_missing(current, f"evaluator stopped before evaluation finished (pid {process.pid})")
        self._close(current)

    # -- jobs ------------------------------------------------------------------------------------

    def post(self, run: str, step: int, examples_seen: int, path: str) -> int:
        """Queue a checkpoint for evaluation; returns its job id at once."""
        job = worker.job_message(self._next_job, run, step, examples_seen, path)
        self._next_job += 1
        self._drain()
        self.start()  # no-op while a worker runs; a new one after a crash
        if self._worker is None:
            self._finished.append(worker.blank_result(job, "error", self._fatal or "evaluator is not running"))
            return job["job"]
        self._worker.outstanding[job["job"]] = job
        self._worker.jobs.put(job)
        return job["job"]

    def _pending(self) -> dict[int, dict[str, Any]] | None:
        return None if self._worker is None else self._worker.outstanding

    def _waitables(self) -> list[Any]:
        return [self._worker.results, self._worker.process.sentinel]

    def cancel(self, jobs: Iterable[int]) -> None:
        """Give up on these jobs: the worker skips them if not started; late results are dropped."""
        ids = set(jobs)
        if self._worker is None or not ids:
            return
        ids &= self._worker.outstanding.keys()
        for job_id in ids:
            del self._worker.outstanding[job_id]
        self._cancelled |= ids
        if ids:
            self._worker.jobs.put({"kind": "cancel", "jobs": sorted(ids)})

    @property
    def outstanding(self) -> list[int]:
        """Job ids posted and not yet answered."""
        return sorted(self._worker.outstanding) if self._worker is not None else []

    # -- internals -------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Read every message waiting on the result pipe; notice a dead worker."""
        current = self._worker
        if current is None:
            return
        try:
            while current.results.poll(0):
                self._handle(current, current.results.recv())
                if self._worker is not current:
                    return
        except (EOFError, OSError):
            pass  # the worker is gone; its exit status tells how
        else:
            if current.process.is_alive():
                return
            # It may have sent its last messages just before exiting.
            while current.results.poll(0):
                try:
                    self._handle(current, current.results.recv())
                except (EOFError, OSError):
                    break
        if self._worker is current:
            self._worker_gone(current)

    def _handle(self, current: _Worker, message: dict[str, Any]) -> None:
        kind = message["kind"]
        if kind == "ready":
            current.ready = self.ready_info = message
        elif kind == "fatal":
            self._fatal = message["error"]
            warnings.warn(f"{message['error']}; no checkpoints will be evaluated", EvaluatorWarning, stacklevel=3)
            self._record_missing(current, message["error"], status="error")
            current.process.join(_STOP_GRACE_S)
            self._worker = None
            self._close(current)
        elif kind == "result":
            result = message["result"]
            if result["job"] in self._cancelled:
                self._cancelled.discard(result["job"])
                return
            current.outstanding.pop(result["job"], None)
            self._finished.append(result)

    def _worker_gone(self, current: _Worker) -> None:
        """The worker died without being asked to stop: report once, record its jobs as missing."""
        current.process.join(_KILL_GRACE_S)
        code = current.process.exitcode
        pid = current.process.pid
        lost = len(current.outstanding)
        if code == worker.EXIT_ENGINE_LOST:
            gone = f"evaluator process {pid} left: a weight load failed inside its engine (see that evaluation's error)"
        else:
            gone = f"evaluator process {pid} died (exit code {code})"
        self._record_missing(current, f"{gone} before answering")
        self._worker = None
        self._close(current)
        can_restart = self.config.restart_on_failure and self._restarts < MAX_RESTARTS
        self._crashed = can_restart
        if not can_restart:
            why = "restart_on_failure is off" if not self.config.restart_on_failure else f"it died {MAX_RESTARTS + 1} times"
            self._fatal = f"evaluator process died (exit code {code}) and is not restarted: {why}"
        then = "a new one starts with the next checkpoint" if can_restart else "no further checkpoints are evaluated"
        warnings.warn(f"{gone}; {lost} evaluation(s) recorded as missing; {then}", EvaluatorWarning, stacklevel=4)

    def _record_missing(self, current: _Worker, reason: str, status: str = "missing") -> None:
        for job in current.outstanding.values():
            self._finished.append(worker.blank_result(job, status, reason))
        current.outstanding.clear()

    @staticmethod
    def _close(current: _Worker) -> None:
        current.results.close()
        # Nothing more will be read from this queue; do not let interpreter exit wait to flush it.
        current.jobs.cancel_join_thread()
        current.jobs.close()
