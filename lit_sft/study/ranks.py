"""Several processes per trial (DDP, FSDP): the tuner is rank 0 and starts the others."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from lit_sft.devices import trial_world_size
from lit_sft.errors import UserError
from lit_sft.study.config import PROJECT_ROOT, StudyConfig
from lit_sft.training import train

SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "spawn", "fork")
"""Strategies that run fit in child processes the tuner cannot see (its callbacks' results,
the best weights): a trial needs rank 0 in the tuner's own process."""
RANK_EXIT_WAIT_S = 60.0
"""How long the other ranks may take to exit after rank 0's fit has returned."""


def check_trial_layout(cfg: dict[str, Any], study_cfg: StudyConfig) -> None:
    """What a multi-process trial cannot do, all in one UserError."""
    trainer = cfg["trainer"]
    if trial_world_size(trainer) <= 1:
        return
    strategy = str(trainer.get("strategy") or "auto")
    problems = []
    if int(trainer.get("num_nodes") or 1) > 1:
        problems.append("trainer.num_nodes: a trial runs on one machine; use several tune.py workers to use several machines")
    if strategy in SPAWNING_STRATEGIES:
        problems.append(f"trainer.strategy={strategy}: runs fit in child processes whose results the tuner cannot see; use ddp or fsdp")
    if strategy.startswith("fsdp") and str(trainer.get("accelerator") or "auto") == "cpu":
        problems.append("trainer.strategy=fsdp needs GPUs (Lightning's FSDP refuses accelerator=cpu); use ddp on CPU")
    if strategy.startswith("fsdp") and (cfg["evaluator"]["enabled"] or study_cfg.save_best_model):
        problems.append("trainer.strategy=fsdp: the evaluator and study.save_best_model need the full weights on rank 0, "
                        "which the tuner does not gather from FSDP shards; set evaluator.enabled and study.save_best_model to false")
    if problems:
        raise UserError("; ".join(problems))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent(parent: int) -> None:
    """In a rank's process: be killed when the tuner dies, not left waiting in a collective.

    Set by the rank itself (a `preexec_fn` would run between fork and exec of a threaded
    process, where a lock held by another thread can deadlock it).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: a dead tuner's ranks end at the process group's timeout instead
    if os.getppid() != parent:  # the tuner died before the line above
        os._exit(1)


def destroy_process_group() -> None:
    """Lightning leaves the process group up after fit; the next trial needs a fresh one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A trial's config as ranks > 0 run it: the same training, nothing rank 0 does alone."""
    out = copy.deepcopy(cfg)
    out["evaluator"]["enabled"] = False  # rank 0 posts the checkpoints to the study's evaluator
    out["wandb"]["enabled"] = False  # one W&B run per trial, rank 0's
    return out


class Ranks(AbstractContextManager):
    """Ranks 1..N-1 of one trial, each `train(cfg)` in a process of its own.

    Lightning's `ddp` launcher would re-run the command line (`tune.py ...`) for each rank, and
    every copy would open the study and create trials of its own. Instead the tuner is rank 0
    and starts the other ranks with the trial's config; Lightning sees LOCAL_RANK etc. set, as
    under torchrun, and launches nothing. Only rank 0 reports to Optuna, posts checkpoints, logs
    to W&B; the pruning callback broadcasts its decision, early stopping reduces its own, so
    every rank stops at the same step. A rank that fails makes rank 0's next collective fail
    (gloo; NCCL at the process group's timeout); rank 0's failure ends the other ranks.
    """

    ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK")

    def __init__(self, cfg: dict[str, Any], folder: Path, run_name: str, monitor: str) -> None:
        self.world = trial_world_size(cfg["trainer"])
        self.cfg = cfg
        self.spec_path = folder / "ranks.json"
        self.run_name = run_name
        self.monitor = monitor
        self.procs: list[subprocess.Popen] = []
        self.failures: list[str] = []
        """Other ranks that had failed by the end of the trial (`rank 1 exit 1`)."""
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> Ranks:
        if self.world <= 1:
            return self
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(self.world), "NODE_RANK": "0"}
        self.spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec = {"cfg": rank_config(self.cfg), "run_name": self.run_name, "monitor": self.monitor, "parent": os.getpid()}
        self.spec_path.write_text(json.dumps(spec, default=str))
        child_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
        code = "import sys; from lit_sft.study.ranks import rank_main; sys.exit(rank_main(sys.argv[1]))"
        for rank in range(1, self.world):
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", code, str(self.spec_path)], env={**child_env, "LOCAL_RANK": str(rank)},
            ))
        self._saved_env = {k: os.environ.get(k) for k in self.ENV}
        os.environ.update({**env, "LOCAL_RANK": "0"})
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self.world <= 1:
            return
        try:
            destroy_process_group()
            self._end_ranks(wait_s=0.0 if exc_type is not None else RANK_EXIT_WAIT_S)
        finally:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self.spec_path.unlink(missing_ok=True)

    def _end_ranks(self, wait_s: float) -> None:
        self.failures = self.failed_ranks()  # before ending them: a rank we kill has not failed
        deadline = time.monotonic() + wait_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0) if wait_s else 0.001)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if wait_s and proc.returncode not in (0, -signal.SIGKILL):
                warnings.warn(f"rank process {proc.pid} exited with code {proc.returncode} after the trial", stacklevel=2)

    def failed_ranks(self) -> list[str]:
        """`rank 1 exit 1` for each other rank that has exited with an error so far."""
        return [f"rank {i} exit {p.poll()}" for i, p in enumerate(self.procs, start=1) if p.poll() not in (None, 0)]


def rank_main(spec_path: str) -> int:
    """A trial's rank > 0 (started by `Ranks`): train with the trial's config, report nothing."""
    from callbacks.pruning import OptunaPruning
    from lit_sft.cli import quiet

    spec = json.loads(Path(spec_path).read_text())
    _die_with_parent(spec["parent"])
    quiet()
    try:
        train(spec["cfg"], callbacks=[OptunaPruning(None, monitor=spec["monitor"])], run_name=spec["run_name"], other_rank=True)
    finally:
        destroy_process_group()
    return 0


