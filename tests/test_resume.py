"""Resume and faults: dead workers, stale heartbeats, Ctrl-C, kill -9, a killed evaluator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from lightning.pytorch import Callback
from optuna.trial import TrialState

from lit_sft import storage as storage_mod
from lit_sft.study import run
from lit_sft.search_space import load_search_space
from tests.helpers import RaiseAtSecondBatch, sqlite_url, study_cfg, tune_interrupted, wrap_train
from tests.test_workers import SPACE, tune_argv, tune_env

GOOD = {"learning_rate": 3e-2, "batch_size": 8, "weight_decay": 0.0}


def _cfg(model_path: str, tmp_path: Path, study: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    return study_cfg(model_path, tmp_path, SPACE, "resume", study, **sections)


def _study(cfg: dict[str, Any]) -> optuna.Study:
    return optuna.load_study(study_name=cfg["study"]["name"], storage=sqlite_url(Path(cfg["study"]["results_dir"])))


def _running_trial(study: optuna.Study, worker: dict[str, Any] | None, **params: float) -> int:
    trial = study.ask()
    for name, value in params.items():
        trial.suggest_float(name, value, value)
    if worker is not None:
        trial.set_user_attr(storage_mod.WORKER_ATTR, worker)
    return trial.number


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the pid names no process now
    return proc.pid


# ---- recovery, without training -----------------------------------------------------------------


def test_recover_fails_dead_workers_trials_and_retries_them_once(tmp_path):
    url = sqlite_url(tmp_path)
    storage = storage_mod.open_storage(url, heartbeat_interval_s=None)
    study = optuna.create_study(study_name="r", storage=storage)
    here = storage_mod.this_worker()
    dead = {**here, "pid": _dead_pid(), "start": "1"}
    elsewhere = {**here, "machine": "another-host|boot|pid:[1]"}
    a = _running_trial(study, dead, x=0.25)  # its worker died on this machine
    b = _running_trial(study, here, x=0.5)  # this process: alive
    c = _running_trial(study, elsewhere, x=0.75)  # another machine: the heartbeat's business
    d = study.ask()
    d.suggest_float("x", 0.1, 0.1)
    d.set_user_attr("reason", "exception")
    d.set_user_attr("error", "RuntimeError: boom")
    study.tell(d, state=TrialState.FAIL)  # the parameters' own failure: counted, not retried
    e = study.ask()
    e.suggest_float("x", 0.9, 0.9)
    e.set_user_attr("reason", "interrupted")
    study.tell(e, state=TrialState.FAIL)  # Ctrl-C: retried

    notes = storage_mod.recover(study, storage, max_retries=2)

    trials = {t.number: t for t in study.get_trials()}
    assert trials[a].state == TrialState.FAIL and trials[a].user_attrs["reason"] == "worker_died"
    assert f"pid {dead['pid']}" in trials[a].user_attrs["error"]
    assert trials[b].state == TrialState.RUNNING and trials[c].state == TrialState.RUNNING
    retries = [t for t in trials.values() if t.state == TrialState.WAITING]
    assert sorted((t.user_attrs["retry_of"], t.params["x"]) for t in retries) == [(a, 0.25), (e.number, 0.9)]
    assert all(t.system_attrs["retry_history"] == [t.user_attrs["retry_of"]] for t in retries)
    assert len(notes) == 3  # a failed, a queued, e queued
    # What counts towards n_trials: not the queued retries, not the failures they replace.
    assert sorted(t.number for t in storage_mod.counted(study.get_trials())) == [b, c, d.number]
    # Recovering again (another worker, a restart) queues nothing twice.
    assert storage_mod.recover(study, storage, max_retries=2) == []
    assert len(study.get_trials()) == len(trials)


def test_a_trial_that_keeps_killing_its_worker_is_retried_max_retries_times(tmp_path):
    storage = storage_mod.open_storage(sqlite_url(tmp_path), heartbeat_interval_s=None)
    study = optuna.create_study(study_name="r", storage=storage)
    dead = {**storage_mod.this_worker(), "pid": _dead_pid(), "start": "1"}
    _running_trial(study, dead, x=0.5)
    for attempt in range(3):
        storage_mod.recover(study, storage, max_retries=2)
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if attempt == 2:
            assert waiting == []  # third death: given up
            break
        retry = study.ask()  # a worker takes the retry, then dies as well
        assert retry.params == {"x": 0.5}
        retry.set_user_attr(storage_mod.WORKER_ATTR, dead)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert len(storage_mod.counted(trials)) == 1  # the last failure counts, as any failure does


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # the test's own ask()
def test_a_stale_trial_of_another_machine_is_retried_after_its_heartbeat_stops(tiny_model_path, tmp_path):
    cfg = _cfg(tiny_model_path, tmp_path, study={"n_trials": 1, "heartbeat_interval_s": 1})
    (tmp_path / "results").mkdir()
    storage = storage_mod.open_storage(sqlite_url(tmp_path / "results"), heartbeat_interval_s=1)
    study = optuna.create_study(study_name="resume", storage=storage)
    study.enqueue_trial(GOOD)
    trial = study.ask()
    load_search_space(tmp_path / "space.yaml").suggest(trial)  # as a worker of another machine did
    trial.set_user_attr(storage_mod.WORKER_ATTR, {"host": "gone", "pid": 1, "machine": "gone|x|y", "start": "1"})
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("resume"), 0))
    time.sleep(4.5)  # grace period: 3 intervals, + 1 s: SQLite keeps whole seconds

    run.tune(cfg)

    trials = _study(cfg).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["retry_of"] == 0 and trials[1].params == GOOD
    assert "reason" not in trials[0].user_attrs  # its worker could not say why: the report calls it stale


# ---- Ctrl-C, then the same command --------------------------------------------------------------




def test_an_interrupted_trial_is_retried_with_its_parameters_by_the_next_run(tiny_model_path, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_path, tmp_path, study={"n_trials": 3})
    with monkeypatch.context() as patch:
        wrap_train(patch, {1: [RaiseAtSecondBatch(KeyboardInterrupt())]})
        tune_interrupted(cfg)
    interrupted = _study(cfg).trials[1]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["reason"] == "interrupted"

    summary = run.tune(cfg)

    trials = _study(cfg).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == interrupted.params
    assert summary["counted"] == 3 and summary["retries"] == [{"trial": 2, "retry_of": 1}]


# ---- kill -9 mid-trial, then the same command -----------------------------------------------------


def _wait_for_mid_trial(url: str, name: str, proc: subprocess.Popen, timeout_s: float) -> optuna.trial.FrozenTrial:
    """A trial after the first, running, with an evaluation reported: the moment to kill."""
    deadline = time.monotonic() + timeout_s
    storage = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker ended before it could be killed mid-trial"
        try:  # the worker creates the file and its tables: look once they are there
            storage = storage or storage_mod.open_storage(url, heartbeat_interval_s=None)
            trials = optuna.load_study(study_name=name, storage=storage).trials
        except (KeyError, storage_mod.UserError):
            trials = []
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number >= 1 and t.intermediate_values]
        if running and any(t.state == TrialState.COMPLETE for t in trials):
            return running[0]
        time.sleep(0.05)
    raise AssertionError("no trial was caught mid-way")


@pytest.mark.slow
def test_kill_9_mid_trial_then_the_same_command_loses_nothing(tiny_model_path, tmp_path):
    results = tmp_path / "results"
    wandb_dir = tmp_path / "wandb"
    argv = tune_argv(tiny_model_path, results, "killed", "--study.n_trials", "3", "--wandb.enabled", "true",
                     "--wandb.save_dir", str(wandb_dir), max_steps=20, interval=4)
    proc = subprocess.Popen(argv, cwd=tmp_path, env=tune_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = _wait_for_mid_trial(sqlite_url(results), "killed", proc, timeout_s=180)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    before = optuna.load_study(study_name="killed", storage=sqlite_url(results)).trials
    finished = [t for t in before if t.state == TrialState.COMPLETE]
    histories = {t.number: (results / "trials" / "killed" / f"trial-{t.number:04d}" / "history.json").read_bytes() for t in finished}
    runs_before = sorted(p.name for p in (wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs_before) == len(finished) + 1  # the killed trial's run exists too, unfinished

    rerun = subprocess.run(argv, cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    after = {t.number: t for t in optuna.load_study(study_name="killed", storage=sqlite_url(results)).trials}
    # The trials finished before the kill are untouched: same values, same end times, same files.
    for t in finished:
        assert (after[t.number].value, after[t.number].datetime_complete) == (t.value, t.datetime_complete)
        assert (results / "trials" / "killed" / f"trial-{t.number:04d}" / "history.json").read_bytes() == histories[t.number]
    # The killed trial: failed with the reason, retried once with the same parameters.
    killed = after[victim.number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["reason"] == "worker_died"
    assert f"pid {proc.pid}" in killed.user_attrs["error"]
    retries = [t for t in after.values() if t.user_attrs.get("retry_of") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params and retries[0].state == TrialState.COMPLETE
    # Totals: n_trials complete, one failure that does not count, nothing left running.
    states = [t.state for t in after.values()]
    assert states.count(TrialState.COMPLETE) == 3 and states.count(TrialState.FAIL) == 1 and len(states) == 4
    data = yaml.safe_load((results / "study_results.yaml").read_text())
    assert data["counts"] == {"complete": 3, "fail": 1} and data["counted"] == 3
    assert data["retries"] == [{"trial": retries[0].number, "retry_of": victim.number}]
    # W&B: every earlier run kept, one new run per trial trained by the rerun, none redone.
    runs_after = sorted(p.name for p in (wandb_dir / "wandb").glob("offline-run-*"))
    assert set(runs_before) <= set(runs_after)
    assert len(runs_after) - len(runs_before) == 3 - len(finished)
    assert f"trial {victim.number}: its worker (pid {proc.pid}" in rerun.stdout
    assert not list((results / "trials" / "killed").glob("trial-*/weights/*")), "weight files left behind"


# ---- the evaluator killed mid-study -------------------------------------------------------------


class KillEvaluator(Callback):
    """Right after the first checkpoint was posted: SIGKILL the evaluator's process."""

    def __init__(self) -> None:
        self.killed: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        poster = next(c for c in trainer.callbacks if type(c).__name__ == "CheckpointPoster")
        if self.killed is None and poster._posted_steps and poster.client.pid:
            self.killed = poster.client.pid
            os.kill(self.killed, signal.SIGKILL)


@pytest.mark.slow
def test_a_killed_evaluator_marks_its_evaluations_missing_and_the_study_completes(tiny_model_path, tmp_path, monkeypatch):
    killer = KillEvaluator()
    wrap_train(monkeypatch, {0: [killer]})
    cfg = _cfg(tiny_model_path, tmp_path, study={"n_trials": 2},
               evaluator={"enabled": True, "num_problems": 4, "max_new_tokens": 4, "batch_size": 4, "final_wait_s": 120})
    with pytest.warns(Warning, match="died"):
        summary = run.tune(cfg)

    trials = _study(cfg).trials
    assert killer.killed is not None
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    first = json.loads((tmp_path / "results" / "trials" / "resume" / "trial-0000" / "history.json").read_text())["evaluations"]
    assert first[0]["status"] == "missing" and "died" in first[0]["error"]
    assert trials[0].user_attrs["evaluations_missing"] >= 1
    # A new evaluator took over: later checkpoints were graded, in this trial and the next.
    assert any(e["status"] == "ok" for e in first)
    second = json.loads((tmp_path / "results" / "trials" / "resume" / "trial-0001" / "history.json").read_text())["evaluations"]
    assert [e["status"] for e in second] == ["ok"] * 3
    # Weight files: every one deleted once evaluated or given up on.
    assert not list((tmp_path / "results").rglob("*.safetensors"))
    assert summary["disk"]["weight_files_bytes"] == 0
