"""The evaluator process: load the model once, then evaluate each posted checkpoint.

Runs under the multiprocessing spawn context. It imports neither Lightning nor the training
code, so it starts in the time it takes to import torch + transformers and load the model.

Messages in (job queue): {"kind": "job", job fields}, {"kind": "cancel", "jobs": [...]},
{"kind": "stop"}. Messages out (result pipe, whose write end only this process holds):
{"kind": "ready", ...} or {"kind": "fatal", ...} first, then {"kind": "result", "result": {...}}
per job, in the order the jobs were posted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("correct", "wrong_answer", "format_failure")
_PARENT_POLL_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """Everything the worker needs, picklable (plain data only)."""

    model_path: str
    """Local folder or hub id of the model (the same one training starts from)."""
    backend: str
    """`transformers` or `vllm` (already resolved)."""
    device: str
    """Resolved device, e.g. `cpu`, `cuda:1`."""
    problems: list[tuple[str, str]]
    """(prompt, ground truth) of the fixed validation problems, already cut to num_problems."""
    max_new_tokens: int
    batch_size: int
    num_examples: int
    grading_timeout_s: float
    gpu_memory_utilization: float
    parent_pid: int
    """The training process: the worker exits when it is gone."""
    torch_threads: int | None = field(default=None)
    """CPU threads for generation on CPU; None keeps torch's default."""
    kv_cache_memory_bytes: int | None = field(default=None)
    """vLLM only: KV cache size; None: `backends.CPU_KV_CACHE_BYTES` on CPU, else by share of GPU."""


def job_message(number: int, run: str, step: int, examples_seen: int, path: str, **extra: Any) -> dict[str, Any]:
    """A checkpoint to grade, as both clients send it (to their own worker or to a shared server)."""
    return {"kind": "job", "job": number, "run": str(run), "step": int(step), "examples_seen": int(examples_seen),
            "path": str(path), **extra}


def blank_result(job: dict[str, Any], status: str, error: str | None, seconds: float = 0.0) -> dict[str, Any]:
    """A result dict in the documented shape, with no figures (for errors and missing results)."""
    return {
        "job": job["job"],
        "run": job["run"],
        "step": job["step"],
        "examples_seen": job["examples_seen"],
        "path": job["path"],
        "status": status,
        "error": error,
        "accuracy": None,
        "format_accuracy": None,
        "correct": None,
        "wrong_answer": None,
        "format_failure": None,
        "num_problems": None,
        "mean_response_length": None,
        "examples": [],
        "seconds": seconds,
    }


def summarise(
    job: dict[str, Any],
    prompts: list[str],
    answers: list[str],
    texts: list[str],
    lengths: list[int],
    categories: list[str],
    num_examples: int,
    seconds: float,
) -> dict[str, Any]:
    """The result dict of one finished evaluation."""
    n = len(categories)
    counts = Counter(categories)
    result = blank_result(job, "ok", None, seconds)
    result.update(
        accuracy=counts["correct"] / n,
        format_accuracy=(counts["correct"] + counts["wrong_answer"]) / n,
        num_problems=n,
        mean_response_length=sum(lengths) / n,
        examples=[
            {"prompt": prompts[i], "response": texts[i], "answer": answers[i], "category": categories[i]}
            for i in range(min(num_examples, n))
        ],
        **{c: counts[c] for c in CATEGORIES},
    )
    return result


def evaluate(backend: Any, spec: WorkerSpec, job: dict[str, Any]) -> dict[str, Any]:
    """Load the job's weights, generate for every problem, grade: an "ok" or "error" result."""
    from lit_sft.grading import grade

    start = time.perf_counter()
    try:
        backend.load_weights(job["path"])
    except Exception as err:  # the file is the poster's; its fault must not stop the worker
        return blank_result(job, "error", f"cannot load checkpoint: {err}", time.perf_counter() - start)
    prompts = [p for p, _ in spec.problems]
    answers = [a for _, a in spec.problems]
    try:
        generations = backend.generate(prompts)
        categories = [grade(g.text, a, timeout_s=spec.grading_timeout_s).category.value for g, a in zip(generations, answers, strict=True)]
    except Exception as err:
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        return blank_result(job, "error", f"generation failed: {detail}", time.perf_counter() - start)
    return summarise(
        job,
        prompts,
        answers,
        [g.text for g in generations],
        [g.num_tokens for g in generations],
        categories,
        spec.num_examples,
        time.perf_counter() - start,
    )


def _watch_parent(parent_pid: int) -> None:
    """Exit as soon as the training process is gone, even mid-generation.

    A daemon process is only reaped by a parent that exits normally; one killed by SIGKILL or
    the OOM killer leaves its children running (and holding GPU memory) otherwise.
    """

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(_PARENT_POLL_S)

    threading.Thread(target=watch, name="lit-sft-parent-watch", daemon=True).start()


def _take_messages(jobs: Any, pending: deque, cancelled: set[int], block: bool) -> bool:
    """Move every waiting message into `pending`/`cancelled`; False once a stop was read."""
    import queue

    while True:
        try:
            message = jobs.get(block=block)
        except queue.Empty:
            return True
        except (EOFError, OSError):
            return False  # the client's end is gone
        block = False
        if message["kind"] == "stop":
            return False
        if message["kind"] == "cancel":
            cancelled.update(message["jobs"])
        else:
            pending.append(message)


EXIT_ENGINE_LOST = 3
"""Exit code after a weight load failed inside the engine: the client starts a fresh worker."""


def serve(backend: Any, spec: WorkerSpec, jobs: Any, results: Any) -> bool:
    """Evaluate jobs in posted order until told to stop (True) or the engine is lost (False)."""
    pending: deque[dict[str, Any]] = deque()
    cancelled: set[int] = set()
    while True:
        # Read everything queued before starting a job, so a cancel posted after it still counts.
        if not _take_messages(jobs, pending, cancelled, block=not pending):
            return True
        if not pending:
            continue  # only a cancel came in
        job = pending.popleft()
        if job["job"] in cancelled:
            cancelled.discard(job["job"])
            continue
        results.send({"kind": "result", "result": evaluate(backend, spec, job)})
        if not backend.healthy:
            # Its weights are no file's: the client starts a fresh worker with the next post (jobs
            # still queued here come back as missing).
            return False


DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def load_backend(spec: WorkerSpec) -> Any:
    """Set this process's threads, build the engine, warm up grading: once per evaluator process
    (the child evaluator here, or the shared server)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight load would flood the training log
    if spec.torch_threads:
        import torch

        torch.set_num_threads(spec.torch_threads)
        # vLLM's CPU worker cuts torch to one thread for serving unless OMP_NUM_THREADS was
        # set from outside (vllm/utils/torch_utils.py, set_torch_threads_for_runtime). This
        # process is the evaluator's alone, so its setting reaches no training thread.
        os.environ["OMP_NUM_THREADS"] = str(spec.torch_threads)
    from lit_sft.evaluator.backends import create_backend

    backend = create_backend(
        spec.backend,
        spec.model_path,
        spec.device,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        kv_cache_memory_bytes=spec.kv_cache_memory_bytes,
    )
    import lit_sft.grading  # noqa: F401

    with contextlib.suppress(ImportError):
        # grading imports it at its first non-trivial comparison; sympy takes seconds, so
        # pay for it before "ready" rather than inside the first evaluation.
        import math_verify  # noqa: F401
    return backend


def main(spec: WorkerSpec, jobs: Any, results: Any) -> None:
    """Process entry point (the spawn target); `results` is the write end of a Pipe."""
    # Ctrl-C reaches the whole process group; the training process decides how to shut down
    # and stops us itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_parent(spec.parent_pid)
    # Started from rank 0 of a DDP trial, we inherit its rank variables; vLLM and torch would
    # read them as ours and try to join that process group.
    for name in DISTRIBUTED_ENV:
        os.environ.pop(name, None)
    start = time.perf_counter()
    try:
        backend = load_backend(spec)
    except BaseException as err:  # noqa: BLE001 - anything that stops start-up goes to the client
        detail = "".join(traceback.format_exception_only(type(err), err)).strip()
        results.send({"kind": "fatal", "error": f"evaluator start-up failed: {detail}"})
        _exit(1)
    results.send(
        {
            "kind": "ready",
            "pid": os.getpid(),
            "load_seconds": time.perf_counter() - start,
            "backend": backend.name,
            "device": backend.device,
            "torch_threads": _torch_threads(),
            # Start-up stays fast only while nothing drags in the training stack.
            "lightning_imported": any(m.split(".")[0] in ("lightning", "pytorch_lightning") for m in sys.modules),
        }
    )
    healthy = True
    try:
        healthy = serve(backend, spec, jobs, results)
    except (BrokenPipeError, EOFError, ConnectionResetError):
        pass  # the client closed its end: nobody is left to serve
    _exit(0 if healthy else EXIT_ENGINE_LOST)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _exit(code: int) -> None:
    """Exit now. Every message went out through the pipe synchronously; tearing down torch,
    transformers and sympy at interpreter exit takes seconds that `stop` would spend waiting."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
