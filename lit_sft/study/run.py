"""The study loop: `tune(cfg)` opens (or resumes, or joins) the study, runs trials until its
budget of examples is spent (or it has `n_trials`, or time is up), and writes the report from
the storage."""

from __future__ import annotations

import gc
import time
import warnings
from contextlib import AbstractContextManager
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from lit_sft import secrets
from lit_sft import storage as storage_mod
from lit_sft.config import check, complete
from lit_sft.errors import UserError
from lit_sft.evaluator.launch import start_evaluator
from lit_sft.evaluator.remote import check_server
from lit_sft.search_space import SearchSpace, load_search_space
from lit_sft.study import budget as budget_mod
from lit_sft.study import report
from lit_sft.study.build import open_study, prepare_results_dir, results_dir_problem
from lit_sft.study.config import StudyConfig
from lit_sft.study.dashboard_note import save_dashboard_note
from lit_sft.study.disk import disk_usage, megabytes, remove_leftovers
from lit_sft.study.final_test import run_final_test
from lit_sft.study.objective import Objective, TrialFailed
from lit_sft.study.progress import Progress
from lit_sft.study.ranks import check_trial_layout


def free_memory(study: optuna.Study, trial: FrozenTrial) -> None:
    """After each trial, once its exception (and the frames it pins) is gone: release memory
    so an OOM in one trial does not starve the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_data(cfg: dict[str, Any], space: SearchSpace) -> None:
    """Read, tokenize and check the data every trial will use, before the study is opened.

    A broken record found by the first trial would leave a failed trial in the study, counted
    towards n_trials. The tokenized split is cached for the process, so the trials reuse it.
    """
    from lit_sft.data import SFTDataModule
    from lit_sft.weights import resolve_model_path

    from lit_sft.data import batch_problem

    tokenizer = cfg["data"].get("tokenizer_name_or_path") or resolve_model_path(cfg["model"]["model_name_or_path"])
    # The batch sizes that will run are the search space's: the config's own is checked only when
    # the space does not set it (setup's own check is given a batch of 1, so it never judges it).
    data = SFTDataModule(**{**cfg["data"], "tokenizer_name_or_path": tokenizer, "batch_size": 1, "micro_batch_size": None})
    data.setup("fit")
    if cfg["evaluator"]["enabled"]:
        data.validation_problems  # noqa: B018 - reading them is the check
        data.test_problems  # noqa: B018
    batch = space.by_key("data.batch_size")
    largest = batch.largest if batch is not None else cfg["data"]["batch_size"]
    if largest > len(data.train_set):
        where = f"the search space ({space.path}) reaches {largest}, which" if batch is not None else f"{largest}"
        raise UserError(batch_problem(largest, largest, data.split_note(len(data.train_set))).replace(
            f"data.batch_size={largest} is", f"data.batch_size: {where} is", 1))


def preflight(cfg: dict[str, Any], study_cfg: StudyConfig) -> None:
    """What would fail after the study exists, checked before anything is created: the results
    folder (another study's report or model there), the evaluator's device and backend."""
    problems = []
    taken = results_dir_problem(study_cfg)
    if taken:
        problems.append(taken)
    if cfg["evaluator"]["enabled"] and not cfg["evaluator"].get("address"):  # a shared server places itself
        from lit_sft.evaluator.config import place

        try:
            place(cfg)
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise UserError("; ".join(problems))


def tune(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume, or join) the study described by `cfg["study"]`; returns the summary
    written to results_dir/study_results.yaml."""
    cfg = complete(cfg, tune=True)
    check(cfg)
    study_cfg = StudyConfig.from_dict(cfg["study"])
    if study_cfg.n_trials is None and not cfg["budget"].get("total_examples") and not study_cfg.timeout_s:
        raise UserError("study.n_trials: null (no cap) needs budget.total_examples or study.timeout_s, "
                        "or the study would never end")
    secrets.register_url(study_cfg.storage_url)
    secrets.register_environment()
    secrets.scrub_argv()
    space = load_search_space(study_cfg.search_space_path(), cfg)
    check_trial_layout(cfg, study_cfg)
    preflight(cfg, study_cfg)
    check_data(cfg, space)
    check_server(cfg, test=True)  # a shared evaluator (evaluator.address) refusing us: before any trial
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
    total = cfg["budget"].get("total_examples")
    done = len(storage_mod.counted(trials))
    running = sum(t.state == TrialState.RUNNING for t in trials)
    queued = sum(t.state == TrialState.WAITING for t in trials)
    used = budget_mod.spent(trials, total)
    stop = _stop_reason(study_cfg, done, used)
    todo = f"nothing left to run ({stop})" if stop else (
        f"running up to {study_cfg.n_trials - done} more" if study_cfg.n_trials else "running trials while the budget lasts")
    extra = "".join([f", {running} running elsewhere" if running else "", f", {queued} queued" if queued else ""])
    count = f"{done} of {study_cfg.n_trials} trials" if study_cfg.n_trials else f"{done} trials"
    print(f"study {study_cfg.name} ({secrets.mask_url(url)}): {count} so far, {used.describe()}{extra}, {todo}", flush=True)
    evaluator = None
    start = time.perf_counter()
    try:
        if not stop:
            evaluator = start_evaluator(cfg)
            objective = Objective(cfg, study_cfg, space, evaluator, pruner=study.pruner)
            _optimize(study, storage, lock, objective, [Progress(study_cfg, objective.slots, total), free_memory])
    except KeyboardInterrupt:
        print("interrupted: writing the report of the trials so far", flush=True)
        _report(study, study_cfg, cfg["budget"].get("total_examples"))
        raise
    finally:
        if evaluator is not None:
            evaluator.stop()
    # After the study's evaluator is gone: the test evaluator loads a model of its own.
    run_final_test(study, cfg, study_cfg)
    summary = _report(study, study_cfg, cfg["budget"].get("total_examples"))
    summary["seconds"] = round(time.perf_counter() - start, 1)
    return summary


def _stop_reason(study_cfg: StudyConfig, done: int, used: budget_mod.Spent) -> str | None:
    """Why no new trial may start (None: one may)."""
    if used.exhausted:
        return f"budget.total_examples spent: {used.examples:,} of {used.total:,} examples trained"
    if study_cfg.n_trials is not None and done >= study_cfg.n_trials:
        return f"study.n_trials reached: {done} of {study_cfg.n_trials}"
    return None


def _next_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, lock: AbstractContextManager, objective: Objective) -> optuna.Trial | None:
    """Under the study lock: recover dead workers' trials, then the next trial if the study has
    budget (examples) and room (n_trials) left.

    Counting and creating under one lock is what keeps workers that finish together from both
    starting the study's last trial (Optuna's MaxTrialsCallback counts, then asks, unlocked).
    """
    study_cfg = objective.study_cfg
    with lock:
        for note in storage_mod.recover(study, storage, study_cfg.max_retries):
            print(note, flush=True)
        trials = study.get_trials(deepcopy=False)
        used = storage_mod.counted(trials)
        spent = budget_mod.spent(trials, objective.cfg["budget"].get("total_examples"))
        stop = _stop_reason(study_cfg, len(used), spent)
        if stop:
            print(f"study {study_cfg.name}: no new trial, {stop}", flush=True)
            return None
        with warnings.catch_warnings():
            # Optuna expects heartbeats from Study.optimize only; _run_trial beats this trial itself.
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            trial = study.ask()  # a queued trial (a retry, an enqueued point) first, else a new one
        trial.set_user_attr(storage_mod.WORKER_ATTR, storage_mod.this_worker())
    objective.slots[trial.number] = len(used) + 1
    if spent.total is not None:
        objective.start_notes[trial.number] = f"budget: {spent.describe()}"
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
    """Run trials until the study's budget is spent or it has `n_trials` (counting every
    worker's), or this process's time is up."""
    timeout = objective.study_cfg.timeout_s
    deadline = time.monotonic() + timeout if timeout else None
    while deadline is None or time.monotonic() < deadline:
        trial = _next_trial(study, storage, lock, objective)
        if trial is None:
            return
        frozen = _run_trial(study, storage, trial, objective)
        for callback in callbacks:
            callback(study, frozen)


def _report(study: optuna.Study, study_cfg: StudyConfig, total_examples: int | None = None) -> dict[str, Any]:
    """The report from the storage; workers finishing together on one machine take turns."""
    results_dir = study_cfg.results_path
    with storage_mod.FileLock(results_dir / ".report.lock"):
        remove_leftovers(study, results_dir)
        summary = report.write_report(
            study, metric=study_cfg.metric, n_trials=study_cfg.n_trials, results_dir=results_dir, plots=study_cfg.plots,
            total_examples=total_examples,
        )
        trials = study.get_trials(deepcopy=False)
        summary["counted"] = len(storage_mod.counted(trials))
        summary["retries"] = [{"trial": t.number, "retry_of": t.user_attrs["retry_of"]} for t in trials if "retry_of" in t.user_attrs]
        summary["storage"] = secrets.mask_url(study_cfg.storage_url)
        summary["disk"] = disk_usage(study.study_name, results_dir)
        report.write_results(summary, results_dir)
        save_dashboard_note(study, summary)
    disk = summary["disk"]
    print(f"disk: {megabytes(disk['results_dir_bytes'])} in {results_dir} (best model {megabytes(disk['best_model_bytes'])}, "
          f"evaluator weight files {megabytes(disk['weight_files_bytes'])})", flush=True)
    return summary
