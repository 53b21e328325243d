"""The study: TPE proposes learning rate, batch size and weight decay; ASHA prunes; each trial is
one `train(cfg)`; the report is written from the storage at the end.

Resumable and shareable. The study lives in its storage (lit_sft/storage.py: a SQLite file by
default, PostgreSQL across machines). Any number of `tune.py` processes given the same storage
and study name work on it together, and running the same command again continues it:

- `n_trials` is the study's total. Under the study lock a worker recovers trials whose worker
  died (FAIL, queued again with the same parameters), counts the study's trials, and creates the
  next one only if the count is short; so several workers stop at exactly `n_trials`.
- The sampler is reseeded from the trial number before each trial: numbers are unique across
  workers and restarts, so no two workers propose the same point and a restart proposes new ones.
- Everything a trial writes is keyed by study and trial number; the best model is swapped in
  under a lock; the report is rebuilt from the storage by whichever worker finishes.
- A trial may use several processes (`--trainer.devices 2 --trainer.strategy ddp`): the tuner
  starts ranks 1..N-1 itself, as plain training processes that never touch the study.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from lit_sft import report, secrets
from lit_sft import storage as storage_mod
from lit_sft.config import complete
from lit_sft.devices import trial_world_size
from lit_sft.errors import UserError
from lit_sft.evaluator.launch import start_evaluator
from lit_sft.pruner import TolerantSuccessiveHalvingPruner
from lit_sft.report import format_value
from lit_sft.search_space import SearchSpace, load_search_space
from lit_sft.study_config import PROJECT_ROOT, StudyConfig
from lit_sft.training import save_pretrained, train

SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "spawn", "fork")
"""Strategies that run fit in child processes the tuner cannot see (its callbacks' results,
the best weights): a trial needs rank 0 in the tuner's own process."""
RANK_EXIT_WAIT_S = 60.0
"""How long the other ranks may take to exit after rank 0's fit has returned."""


class TrialFailed(Exception):
    """A trial raised: it is recorded as FAIL with its error and the study goes on.

    A UserError (a bad config, which every later trial would repeat) is not turned into this,
    so it still stops the study at once.
    """


# ---- study construction ---------------------------------------------------------------------


def default_min_resource(cfg: dict[str, Any], space: SearchSpace) -> int:
    """Examples the largest-batch trial has seen at its first evaluation.

    Reports are made at every evaluation, i.e. every `val_check_interval * batch_size`
    examples, so a smaller first rung would be judged on different amounts of data: the
    small-batch trials at their first evaluation, the large-batch ones well past it. With an
    example budget every trial evaluates every `budget.eval_every_examples`: that is the rung.
    """
    every = (cfg.get("budget") or {}).get("eval_every_examples")
    if every:
        return int(every)
    interval = cfg["trainer"].get("val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise UserError(
            f"study.pruner.min_resource: cannot derive it from trainer.val_check_interval={interval!r} "
            "(an epoch fraction or none); set study.pruner.min_resource (in examples seen)"
        )
    batch = space.by_key("data.batch_size")
    largest = batch.largest if batch is not None else cfg["data"]["batch_size"]
    return int(interval * largest)


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random state is reset from (seed, trial number) at the start of every trial.

    One seed per process would make workers started together propose the same first random
    points; a seed per trial number (numbers are handed out by the storage, unique across
    workers and restarts) keeps them apart, makes a resumed study propose new points, and
    keeps a one-worker study reproducible. TPESampler can only reseed from OS entropy
    (`reseed_rng`), hence the two private attributes; should Optuna rename them, that is the
    fallback.
    """

    def __init__(self, *, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = (self._base_seed + trial.number) % 2**32
        try:
            self._rng.rng.seed(seed)
            self._random_sampler._rng.rng.seed(seed)
        except AttributeError:
            self.reseed_rng()
        super().before_trial(study, trial)


def make_sampler(study_cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s = study_cfg.sampler
    with warnings.catch_warnings():
        # multivariate TPE is marked experimental; it has been stable since Optuna 2.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return TrialSeededTPESampler(
            seed=study_cfg.seed,
            n_startup_trials=s.n_startup_trials,
            constant_liar=s.constant_liar,
            multivariate=s.multivariate,
        )


def make_pruner(study_cfg: StudyConfig, cfg: dict[str, Any], space: SearchSpace) -> optuna.pruners.BasePruner:
    p = study_cfg.pruner
    if not p.enabled:
        return optuna.pruners.NopPruner()
    return TolerantSuccessiveHalvingPruner(
        min_resource=p.min_resource or default_min_resource(cfg, space),
        reduction_factor=p.reduction_factor,
        min_early_stopping_rate=p.min_early_stopping_rate,
        tolerance=p.tolerance,
    )


def open_study(study_cfg: StudyConfig, cfg: dict[str, Any], space: SearchSpace, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it (same name and storage) to resume or join it."""
    study = storage_mod.load_or_create(
        storage, study_cfg.name, study_cfg.direction, sampler=make_sampler(study_cfg), pruner=make_pruner(study_cfg, cfg, space),
    )
    if study.direction.name.lower() != study_cfg.direction:
        raise UserError(
            f"study.direction: study {study_cfg.name!r} in {secrets.mask_url(study_cfg.storage_url)} was created to "
            f"{study.direction.name.lower()}, not {study_cfg.direction}; use another study.name"
        )
    _check_same_space(study, space)
    return study


def _check_same_space(study: optuna.Study, space: SearchSpace) -> None:
    """A resumed study must search the same names: TPE models trials by parameter name."""
    names = set(space.names)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if set(trial.params) != names:
            raise UserError(
                f"study.search_space: study {study.study_name!r} already has trials over "
                f"{sorted(trial.params)}, but {space.path} defines {sorted(names)}; use another study.name"
            )


def prepare_results_dir(study_cfg: StudyConfig) -> None:
    path = study_cfg.results_path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"study.results_dir: cannot create {path}: {err.strerror or err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"study.results_dir: cannot write to {path}")


# ---- several processes per trial (DDP, FSDP) ------------------------------------------------


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
        code = "import sys; from lit_sft.tuning import rank_main; sys.exit(rank_main(sys.argv[1]))"
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
        train(spec["cfg"], callbacks=[OptunaPruning(None, monitor=spec["monitor"])], run_name=spec["run_name"])
    finally:
        destroy_process_group()
    return 0


# ---- the evaluator: one process for the whole study -----------------------------------------


# ---- one trial ------------------------------------------------------------------------------


def _better(value: float, best: float, direction: str) -> bool:
    return value < best if direction == "minimize" else value > best


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return secrets.mask(f"{type(err).__name__}: {text}"[:500] if text else type(err).__name__)


class Objective:
    """Runs one trial: sample, configure, train, record, and keep the best model."""

    def __init__(self, cfg: dict[str, Any], study_cfg: StudyConfig, space: SearchSpace, evaluator: Any = None) -> None:
        self.cfg = cfg
        self.study_cfg = study_cfg
        self.space = space
        self.evaluator = evaluator
        self.results_dir = study_cfg.results_path
        self.slots: dict[int, int] = {}
        """Trial number -> its place k in the study's count (`[k/n]`), set when it is created."""

    def trial_config(self, params: dict[str, Any], number: int) -> dict[str, Any]:
        """The run config of one trial: the sampled values at their keys, outputs keyed by trial."""
        cfg = self.space.apply(self.cfg, params)
        cfg.pop("study", None)
        cfg["output_dir"] = str(report.trial_dir(self.results_dir, self.study_cfg.name, number))
        # The trial's value, early stopping and pruning all follow the study's objective.
        cfg["early_stopping"]["monitor"] = self.study_cfg.metric
        cfg["early_stopping"]["mode"] = "min" if self.study_cfg.direction == "minimize" else "max"
        cfg["wandb"]["group"] = self.study_cfg.name
        if trial_world_size(cfg["trainer"]) > 1 and str(cfg["trainer"].get("strategy") or "auto") == "auto":
            cfg["trainer"]["strategy"] = "ddp"  # what Lightning picks for several devices, made explicit for every rank
        return cfg

    def __call__(self, trial: optuna.Trial) -> float:
        from callbacks.pruning import OptunaPruning

        params = self.space.suggest(trial)
        cfg = self.trial_config(params, trial.number)
        pruning = OptunaPruning(trial, monitor=self.study_cfg.metric)
        run_name = f"trial-{trial.number:04d}"
        progress_start(trial, params, self.study_cfg.n_trials, self.slots.get(trial.number))
        ranks = Ranks(cfg, Path(cfg["output_dir"]), run_name, self.study_cfg.metric)
        try:
            with ranks:
                result = train(
                    cfg, callbacks=[pruning], evaluator=self.evaluator, run_name=run_name,
                    keep_best_weights=self.study_cfg.save_best_model,
                    logger_params={"study": self.study_cfg.name, "trial": trial.number, **params,
                                   **{k: cfg[k] for k in ("model", "data", "trainer")}},
                )
        except UserError as err:
            self._record_failure(trial, err, "config")
            raise
        except (KeyboardInterrupt, SystemExit) as err:
            # Lightning turns Ctrl-C inside fit into sys.exit(1) after its own shutdown; as a
            # KeyboardInterrupt the trial is recorded as FAIL (retried by the next run), not
            # RUNNING forever, and tune() still writes the report of the trials so far.
            self._record_failure(trial, err, "interrupted")
            if isinstance(err, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from err
        except torch.cuda.OutOfMemoryError as err:
            self._record_failure(trial, err, "oom")
            raise TrialFailed(f"oom: {_one_line(err)}") from err
        except Exception as err:
            failed = ranks.failures
            self._record_failure(trial, err, "exception", note=f"other ranks: {', '.join(failed)}" if failed else "")
            raise TrialFailed(_one_line(err)) from err
        value = float(result["objective"])
        self._record(trial, result, pruning)
        pruning.check_pruned()
        if not math.isfinite(value):
            message = (f"no finite {self.study_cfg.metric}: {result['global_step']} steps ran and no "
                       f"evaluation logged it (trainer.val_check_interval vs trainer.max_steps?)")
            trial.set_user_attr("error", message)
            trial.set_user_attr("reason", "no_metric")
            raise TrialFailed(message)
        if self.study_cfg.save_best_model and result.get("best_state") is not None:
            self._keep_if_best(trial, value, result)
        return value

    def _record(self, trial: optuna.Trial, result: dict[str, Any], pruning: Any) -> None:
        attrs: dict[str, Any] = {
            "best_objective": result["objective"],
            "best_step": result["best_step"],
            "best_examples_seen": result["best_examples_seen"],
            "examples_seen": result["examples_seen"],
            "global_step": result["global_step"],
            "stopped_early": result["stopped_early"],
            "seconds": round(float(result["seconds"]), 2),
        }
        if "eval/accuracy" in result:
            attrs["accuracy"] = result["eval/accuracy"]
            attrs["accuracy_step"] = result.get("accuracy_step")
            attrs["categories"] = {c: int(result[f"eval/{c}"]) for c in report.CATEGORIES if f"eval/{c}" in result}
        missing = sum(e.get("status") == "missing" for e in result["evaluations"])
        if missing:
            attrs["evaluations_missing"] = missing
        if pruning.pruned:
            attrs["pruned_at"] = pruning.pruned_at
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        report.save_history(self.results_dir, self.study_cfg.name, trial.number, result["history"], result["evaluations"])

    def _record_failure(self, trial: optuna.Trial, err: BaseException, reason: str, note: str = "") -> None:
        path = report.trial_dir(self.results_dir, self.study_cfg.name, trial.number) / "error.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.mask("".join(traceback.format_exception(err)) + (f"\n{note}\n" if note else "")))
        trial.set_user_attr("error", _one_line(err) + (f" ({note})" if note else ""))
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("traceback_file", str(path))

    def _keep_if_best(self, trial: optuna.Trial, value: float, result: dict[str, Any]) -> None:
        """Save this trial's best weights when no finished trial of the study beats it.

        Saved now, while the weights are in memory (the model object is reused by the next
        trial), and to disk, so the best model survives restarts and other workers see it.
        Workers sharing the results folder swap it under a lock, after checking again what the
        folder holds: two trials finishing together must leave the better one there.
        """
        study = trial.study
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete and not _better(value, study.best_value, self.study_cfg.direction):
            return
        final = self.results_dir / report.BEST_MODEL_DIR
        staging = self.results_dir / f".{report.BEST_MODEL_DIR}.trial-{trial.number:04d}"
        save_pretrained(result, staging)
        report.write_json(staging / report.BEST_MODEL_MARKER, {
            "study": study.study_name, "trial": trial.number, "value": value, "metric": self.study_cfg.metric,
            "params": dict(trial.params), "best_step": result["best_step"], "best_examples_seen": result["best_examples_seen"],
        })
        old = self.results_dir / f".{report.BEST_MODEL_DIR}.old-{trial.number:04d}"
        with storage_mod.FileLock(self.results_dir / f".{report.BEST_MODEL_DIR}.lock"):
            if not self._beats_saved(final, value, study.study_name):
                shutil.rmtree(staging, ignore_errors=True)
                return
            # Swap whole folders so a reader never sees a mix of two trials' files.
            if final.exists():
                final.rename(old)
            staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _beats_saved(self, final: Path, value: float, study_name: str) -> bool:
        try:
            saved = json.loads((final / report.BEST_MODEL_MARKER).read_text())
        except (OSError, ValueError):
            return True  # nothing (readable) there
        if saved.get("study") != study_name or saved.get("metric") != self.study_cfg.metric:
            return True  # another study's model: this study's best replaces it, as before locks
        return _better(value, float(saved["value"]), self.study_cfg.direction)


# ---- progress -------------------------------------------------------------------------------


def _head(number: int, n_trials: int, slot: int | None) -> str:
    """`[k/n] trial N`: k counts the study's trials (over restarts and workers), N is Optuna's number."""
    return f"[{slot or number + 1}/{n_trials}] trial {number}"


def progress_start(trial: optuna.Trial, params: dict[str, Any], n_trials: int, slot: int | None = None) -> None:
    shown = " ".join(f"{k}={format_value(v)}" for k, v in params.items())
    retry_of = trial.user_attrs.get("retry_of") if hasattr(trial, "user_attrs") else None
    again = f" (retry of trial {retry_of})" if retry_of is not None else ""
    print(f"{_head(trial.number, n_trials, slot)} start{again}: {shown}", flush=True)


class Progress:
    """One line per finished trial: its outcome, the best so far."""

    def __init__(self, study_cfg: StudyConfig, slots: dict[int, int] | None = None) -> None:
        self.study_cfg = study_cfg
        self.slots = slots if slots is not None else {}

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        cfg = self.study_cfg
        a = trial.user_attrs
        head = f"{_head(trial.number, cfg.n_trials, self.slots.get(trial.number))} {trial.state.name.lower()}"
        secs = f" in {trial.duration.total_seconds():.0f}s" if trial.duration else ""
        if trial.state == TrialState.COMPLETE:
            acc = f" accuracy={a['accuracy']:.3f}" if a.get("accuracy") is not None else ""
            body = f" {cfg.metric}={format_value(trial.value)}{acc} (best at {a.get('best_examples_seen')} examples){secs}"
        elif trial.state == TrialState.PRUNED:
            body = f" at {a.get('pruned_at')} examples ({cfg.metric} best {format_value(a.get('best_objective'))}){secs}"
        else:
            where = f" [traceback: {a['traceback_file']}]" if "traceback_file" in a else ""
            body = f" ({a.get('reason', '?')}): {a.get('error', 'no error recorded')}{where}"
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = f"best: trial {study.best_trial.number} {cfg.metric}={format_value(study.best_value)}" if complete else "best: none yet"
        print(f"{head}{body} | {best}", flush=True)


def free_memory(study: optuna.Study, trial: FrozenTrial) -> None:
    """After each trial, once its exception (and the frames it pins) is gone: release memory
    so an OOM in one trial does not starve the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- disk -----------------------------------------------------------------------------------


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def remove_leftovers(study: optuna.Study, results_dir: Path) -> None:
    """Delete what finished trials no longer need: evaluator weight files and best-model staging
    folders that a killed worker left behind (a live trial cleans up its own)."""
    finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    for number in finished:
        shutil.rmtree(report.trial_dir(results_dir, study.study_name, number) / "weights", ignore_errors=True)
        for kind in ("trial", "old"):
            shutil.rmtree(results_dir / f".{report.BEST_MODEL_DIR}.{kind}-{number:04d}", ignore_errors=True)


def disk_usage(study_name: str, results_dir: Path) -> dict[str, int]:
    """Bytes the study keeps on this machine; weight files should be 0 once no trial runs."""
    trials = results_dir / "trials" / study_name
    return {
        "results_dir_bytes": _size(results_dir),
        "best_model_bytes": _size(results_dir / report.BEST_MODEL_DIR),
        "weight_files_bytes": sum(_size(d) for d in trials.glob("trial-*/weights")),
        "storage_bytes": sum(_size(p) for p in results_dir.glob("optuna.db*")),
    }


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ---- the study ------------------------------------------------------------------------------


def tune(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume, or join) the study described by `cfg["study"]`; returns the summary
    written to results_dir/study_results.yaml."""
    cfg = complete(cfg, tune=True)
    study_cfg = StudyConfig.from_dict(cfg["study"])
    secrets.register_url(study_cfg.storage_url)
    secrets.register_environment()
    secrets.scrub_argv()
    space = load_search_space(study_cfg.search_space_path(), cfg)
    check_trial_layout(cfg, study_cfg)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress lines replace its per-trial logs
    try:
        return _run(cfg, study_cfg, space)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _run(cfg: dict[str, Any], study_cfg: StudyConfig, space: SearchSpace) -> dict[str, Any]:
    prepare_results_dir(study_cfg)
    url = study_cfg.storage_url
    lock = storage_mod.study_lock(url, study_cfg.name)
    with lock:
        storage = storage_mod.open_storage(url, heartbeat_interval_s=study_cfg.heartbeat_interval_s)
        study = open_study(study_cfg, cfg, space, storage)
        for note in storage_mod.recover(study, storage, study_cfg.max_retries):
            print(note, flush=True)
        trials = study.get_trials(deepcopy=False)
    remove_leftovers(study, study_cfg.results_path)
    done = len(storage_mod.counted(trials))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    queued = sum(t.state == TrialState.WAITING for t in trials)
    remaining = study_cfg.n_trials - done
    todo = f"running up to {remaining} more" if remaining > 0 else "nothing left to run"
    extra = "".join([f", {running} running elsewhere" if running else "", f", {queued} queued" if queued else ""])
    print(f"study {study_cfg.name} ({secrets.mask_url(url)}): {done} of {study_cfg.n_trials} trials so far{extra}, {todo}", flush=True)
    evaluator = None
    start = time.perf_counter()
    try:
        if remaining > 0:
            evaluator = start_evaluator(cfg)
            objective = Objective(cfg, study_cfg, space, evaluator)
            _optimize(study, storage, lock, objective, [Progress(study_cfg, objective.slots), free_memory])
    except KeyboardInterrupt:
        print("interrupted: writing the report of the trials so far", flush=True)
        _report(study, study_cfg)
        raise
    finally:
        if evaluator is not None:
            evaluator.stop()
    summary = _report(study, study_cfg)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


def _next_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, lock: AbstractContextManager, objective: Objective) -> optuna.Trial | None:
    """Under the study lock: recover dead workers' trials, then the next trial if the study is short.

    Counting and creating under one lock is what keeps workers that finish together from both
    starting the study's last trial (Optuna's MaxTrialsCallback counts, then asks, unlocked).
    """
    study_cfg = objective.study_cfg
    with lock:
        for note in storage_mod.recover(study, storage, study_cfg.max_retries):
            print(note, flush=True)
        used = storage_mod.counted(study.get_trials(deepcopy=False))
        if len(used) >= study_cfg.n_trials:
            return None
        with warnings.catch_warnings():
            # Optuna expects heartbeats from Study.optimize only; _run_trial beats this trial itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask()  # a queued trial (a retry, an enqueued point) first, else a new one
        trial.set_user_attr(storage_mod.WORKER_ATTR, storage_mod.this_worker())
    objective.slots[trial.number] = len(used) + 1
    return trial


def _run_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: optuna.Trial, objective: Objective) -> FrozenTrial:
    """Run one trial and tell the storage how it ended.

    `skip_if_finished`: another worker may have failed this trial meanwhile (its heartbeat was
    lost for longer than the grace period, say) and queued a retry; the retry then counts, and
    this run's outcome is dropped rather than crashing the worker.
    """
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), trial.number)
    with storage_mod.Heartbeat(storage, trial_id):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            return study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        except TrialFailed:
            return study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        return study.tell(trial, value, skip_if_finished=True)


def _optimize(study: optuna.Study, storage: optuna.storages.BaseStorage, lock: AbstractContextManager, objective: Objective, callbacks: list) -> None:
    """Run trials until the study has `n_trials` (counting every worker's) or time is up."""
    timeout = objective.study_cfg.timeout_s
    deadline = time.monotonic() + timeout if timeout else None
    while deadline is None or time.monotonic() < deadline:
        trial = _next_trial(study, storage, lock, objective)
        if trial is None:
            return
        frozen = _run_trial(study, storage, trial, objective)
        for callback in callbacks:
            callback(study, frozen)


def _report(study: optuna.Study, study_cfg: StudyConfig) -> dict[str, Any]:
    """The report from the storage; workers finishing together on one machine take turns."""
    results_dir = study_cfg.results_path
    with storage_mod.FileLock(results_dir / ".report.lock"):
        remove_leftovers(study, results_dir)
        summary = report.write_report(
            study, metric=study_cfg.metric, n_trials=study_cfg.n_trials, results_dir=results_dir, plots=study_cfg.plots,
        )
        trials = study.get_trials(deepcopy=False)
        summary["counted"] = len(storage_mod.counted(trials))
        summary["retries"] = [{"trial": t.number, "retry_of": t.user_attrs["retry_of"]} for t in trials if "retry_of" in t.user_attrs]
        summary["storage"] = secrets.mask_url(study_cfg.storage_url)
        summary["disk"] = disk_usage(study.study_name, results_dir)
        report.write_results(summary, results_dir)
    disk = summary["disk"]
    print(f"disk: {_megabytes(disk['results_dir_bytes'])} in {results_dir} (best model {_megabytes(disk['best_model_bytes'])}, "
          f"evaluator weight files {_megabytes(disk['weight_files_bytes'])})", flush=True)
    return summary
