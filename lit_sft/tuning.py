"""The study: TPE proposes learning rate, batch size and weight decay; ASHA prunes; each trial is
one `train(cfg)`; the report is written from the storage at the end.

Resumable and shareable: the study lives in its storage (a SQLite file by default), `n_trials`
counts every trial the study has, per-trial files are keyed by study and trial number, and the
sampler seed moves on with the number of trials so a restart proposes new points.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
import traceback
import warnings
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from lit_sft import report
from lit_sft.config import complete
from lit_sft.errors import UserError
from lit_sft.report import format_value
from lit_sft.search_space import SearchSpace, load_search_space
from lit_sft.study_config import StudyConfig
from lit_sft.training import save_pretrained, train

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
"""Trials that use up `n_trials`: finished ones and those other workers are running now."""


class TrialFailed(Exception):
    """A trial raised: it is recorded as FAIL with its error and the study goes on.

    Only this is passed to Optuna's `catch`, so a UserError (a bad config, which every later
    trial would repeat) still stops the study at once.
    """


# ---- study construction ---------------------------------------------------------------------


def default_min_resource(cfg: dict[str, Any], space: SearchSpace) -> int:
    """Examples the largest-batch trial has seen at its first evaluation.

    Reports are made at every evaluation, i.e. every `val_check_interval * batch_size`
    examples, so a smaller first rung would be judged on different amounts of data: the
    small-batch trials at their first evaluation, the large-batch ones well past it.
    """
    interval = cfg["trainer"].get("val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise UserError(
            f"study.pruner.min_resource: cannot derive it from trainer.val_check_interval={interval!r} "
            "(an epoch fraction or none); set study.pruner.min_resource (in examples seen)"
        )
    batch = space.by_key("data.batch_size")
    largest = batch.largest if batch is not None else cfg["data"]["batch_size"]
    return int(interval * largest)


def make_sampler(study_cfg: StudyConfig, n_existing: int) -> optuna.samplers.BaseSampler:
    s = study_cfg.sampler
    with warnings.catch_warnings():
        # multivariate TPE is marked experimental; it has been stable since Optuna 2.2
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            # A resumed study reseeded with the same seed would replay its first random
            # proposals; offsetting by the trials already there keeps runs reproducible
            # and new.
            seed=study_cfg.seed + n_existing,
            n_startup_trials=s.n_startup_trials,
            constant_liar=s.constant_liar,
            multivariate=s.multivariate,
        )


def make_pruner(study_cfg: StudyConfig, cfg: dict[str, Any], space: SearchSpace) -> optuna.pruners.BasePruner:
    p = study_cfg.pruner
    if not p.enabled:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=p.min_resource or default_min_resource(cfg, space),
        reduction_factor=p.reduction_factor,
        min_early_stopping_rate=p.min_early_stopping_rate,
    )


def make_storage(study_cfg: StudyConfig) -> optuna.storages.BaseStorage | str:
    url = study_cfg.storage_url
    if not url.startswith(("sqlite", "postgresql", "mysql")):
        return url  # journal or other storages: Optuna resolves them itself
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Workers sharing one SQLite file wait for each other's writes instead of failing
        # with "database is locked".
        engine_kwargs["connect_args"] = {"timeout": 60}
    hb = study_cfg.heartbeat_interval_s
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=hb, grace_period=3 * hb if hb else None,
            )
    except Exception as err:  # bad URL, missing driver, unreachable server: all the user's to fix
        raise UserError(f"study.storage: cannot open {url}: {str(err).splitlines()[0]}") from err


def open_study(study_cfg: StudyConfig, cfg: dict[str, Any], space: SearchSpace) -> optuna.Study:
    """Create the study, or load it (same name and storage) to resume or join it."""
    study_cfg.results_path.mkdir(parents=True, exist_ok=True)
    storage = make_storage(study_cfg)
    pruner = make_pruner(study_cfg, cfg, space)
    try:
        existing = optuna.load_study(study_name=study_cfg.name, storage=storage)
    except KeyError:
        existing = None
    if existing is not None and existing.direction.name.lower() != study_cfg.direction:
        raise UserError(
            f"study.direction: study {study_cfg.name!r} in {study_cfg.storage_url} was created to "
            f"{existing.direction.name.lower()}, not {study_cfg.direction}; use another study.name"
        )
    n_existing = len(existing.trials) if existing is not None else 0
    study = optuna.create_study(
        storage=storage, study_name=study_cfg.name, direction=study_cfg.direction,
        sampler=make_sampler(study_cfg, n_existing), pruner=pruner, load_if_exists=True,
    )
    if existing is not None:
        _check_same_space(study, space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of a worker that died: FAIL, not RUNNING forever
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


# ---- the evaluator: one process for the whole study -----------------------------------------


def _train_device(trainer_cfg: dict[str, Any]) -> str:
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    if accelerator == "cpu" or not torch.cuda.is_available():
        return "cpu"
    devices = trainer_cfg.get("devices")
    if isinstance(devices, (list, tuple)) and devices:
        return f"cuda:{devices[0]}"
    return "cuda:0"


def start_evaluator(cfg: dict[str, Any]):
    """The study's EvaluatorClient, started (it loads the model once for every trial), or None."""
    if not cfg["evaluator"]["enabled"]:
        return None
    from lit_sft.data import SFTDataModule
    from lit_sft.evaluator.client import EvaluatorClient
    from lit_sft.evaluator.config import EvaluatorConfig

    # validation_problems is computed without tokenizing the training data.
    problems = SFTDataModule(**cfg["data"]).validation_problems
    client = EvaluatorClient(cfg["model"]["model_name_or_path"], problems, EvaluatorConfig(**cfg["evaluator"]), train_device=_train_device(cfg["trainer"]))
    client.start()
    return client


# ---- one trial ------------------------------------------------------------------------------


def _better(value: float, best: float, direction: str) -> bool:
    return value < best if direction == "minimize" else value > best


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:500] if text else type(err).__name__


class Objective:
    """Runs one trial: sample, configure, train, record, and keep the best model."""

    def __init__(self, cfg: dict[str, Any], study_cfg: StudyConfig, space: SearchSpace, evaluator: Any = None) -> None:
        self.cfg = cfg
        self.study_cfg = study_cfg
        self.space = space
        self.evaluator = evaluator
        self.results_dir = study_cfg.results_path

    def trial_config(self, params: dict[str, Any], number: int) -> dict[str, Any]:
        """The run config of one trial: the sampled values at their keys, outputs keyed by trial."""
        cfg = self.space.apply(self.cfg, params)
        cfg.pop("study", None)
        cfg["output_dir"] = str(report.trial_dir(self.results_dir, self.study_cfg.name, number))
        # The trial's value, early stopping and pruning all follow the study's objective.
        cfg["early_stopping"]["monitor"] = self.study_cfg.metric
        cfg["early_stopping"]["mode"] = "min" if self.study_cfg.direction == "minimize" else "max"
        cfg["wandb"]["group"] = self.study_cfg.name
        return cfg

    def __call__(self, trial: optuna.Trial) -> float:
        from callbacks.pruning import OptunaPruning

        params = self.space.suggest(trial)
        cfg = self.trial_config(params, trial.number)
        pruning = OptunaPruning(trial, monitor=self.study_cfg.metric)
        progress_start(trial, params, self.study_cfg.n_trials)
        try:
            result = train(
                cfg, callbacks=[pruning], evaluator=self.evaluator, run_name=f"trial-{trial.number:04d}",
                keep_best_weights=self.study_cfg.save_best_model,
                logger_params={"study": self.study_cfg.name, "trial": trial.number, **params,
                               **{k: cfg[k] for k in ("model", "data", "trainer")}},
            )
        except UserError as err:
            self._record_failure(trial, err, "config")
            raise
        except (KeyboardInterrupt, SystemExit) as err:
            # Lightning turns Ctrl-C inside fit into sys.exit(1) after its own shutdown; as a
            # KeyboardInterrupt, Optuna records the trial as FAIL (not RUNNING forever) and
            # tune() still writes the report of the trials so far.
            self._record_failure(trial, err, "interrupted")
            if isinstance(err, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from err
        except torch.cuda.OutOfMemoryError as err:
            self._record_failure(trial, err, "oom")
            raise TrialFailed(f"oom: {_one_line(err)}") from err
        except Exception as err:
            self._record_failure(trial, err, "exception")
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
        if pruning.pruned:
            attrs["pruned_at"] = pruning.pruned_at
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        report.save_history(self.results_dir, self.study_cfg.name, trial.number, result["history"], result["evaluations"])

    def _record_failure(self, trial: optuna.Trial, err: BaseException, reason: str) -> None:
        path = report.trial_dir(self.results_dir, self.study_cfg.name, trial.number) / "error.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(err)))
        trial.set_user_attr("error", _one_line(err))
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("traceback_file", str(path))

    def _keep_if_best(self, trial: optuna.Trial, value: float, result: dict[str, Any]) -> None:
        """Save this trial's best weights when no finished trial of the study beats it.

        Saved now, while the weights are in memory (the model object is reused by the next
        trial), and to disk, so the best model survives restarts and other workers see it.
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
        # Swap whole folders so a reader never sees a mix of two trials' files.
        old = self.results_dir / f".{report.BEST_MODEL_DIR}.old-{trial.number:04d}"
        if final.exists():
            final.rename(old)
        staging.rename(final)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


# ---- progress -------------------------------------------------------------------------------


def _head(number: int, n_trials: int) -> str:
    """`[k/n] trial N`: k counts the study's trials (over restarts), N is Optuna's trial number."""
    return f"[{number + 1}/{n_trials}] trial {number}"


def progress_start(trial: optuna.Trial, params: dict[str, Any], n_trials: int) -> None:
    shown = " ".join(f"{k}={format_value(v)}" for k, v in params.items())
    print(f"{_head(trial.number, n_trials)} start: {shown}", flush=True)


class Progress:
    """One line per finished trial: its outcome, the best so far, the study's counts."""

    def __init__(self, study_cfg: StudyConfig) -> None:
        self.study_cfg = study_cfg

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        cfg = self.study_cfg
        a = trial.user_attrs
        head = f"{_head(trial.number, cfg.n_trials)} {trial.state.name.lower()}"
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


# ---- the study ------------------------------------------------------------------------------


def tune(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume, or join) the study described by `cfg["study"]`; returns the summary
    written to results_dir/study_results.yaml."""
    cfg = complete(cfg, tune=True)
    study_cfg = StudyConfig.from_dict(cfg["study"])
    space = load_search_space(study_cfg.search_space_path(), cfg)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our progress lines replace its per-trial logs
    try:
        return _run(cfg, study_cfg, space)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _run(cfg: dict[str, Any], study_cfg: StudyConfig, space: SearchSpace) -> dict[str, Any]:
    study = open_study(study_cfg, cfg, space)
    counted = len(study.get_trials(deepcopy=False, states=COUNTED))
    remaining = study_cfg.n_trials - counted
    todo = f"running up to {remaining} more" if remaining > 0 else "nothing left to run"
    print(f"study {study_cfg.name} ({study_cfg.storage_url}): {counted} of {study_cfg.n_trials} trials so far, {todo}", flush=True)
    evaluator = None
    start = time.perf_counter()
    try:
        if remaining > 0:
            evaluator = start_evaluator(cfg)
            study.optimize(
                Objective(cfg, study_cfg, space, evaluator),
                n_trials=remaining,
                timeout=study_cfg.timeout_s,
                catch=(TrialFailed,),
                callbacks=[
                    # Other workers' trials count too: stop once the study as a whole has enough.
                    optuna.study.MaxTrialsCallback(study_cfg.n_trials, states=COUNTED),
                    Progress(study_cfg),
                    free_memory,
                ],
            )
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


def _report(study: optuna.Study, study_cfg: StudyConfig) -> dict[str, Any]:
    return report.write_report(
        study, metric=study_cfg.metric, n_trials=study_cfg.n_trials, results_dir=study_cfg.results_path, plots=study_cfg.plots,
    )
