"""Several workers on one study: real processes on one SQLite file, started at the same instant."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lit_sft import storage as storage_mod
from lit_sft.study.build import TrialSeededTPESampler
from tests.helpers import sqlite_url

ROOT = Path(__file__).resolve().parents[1]
SPACE = """\
learning_rate: {kind: float, low: 1.0e-4, high: 5.0e-2, log: true, key: model.learning_rate}
batch_size: {kind: categorical, choices: [8, 16], key: data.batch_size}
weight_decay: {kind: float, low: 0.0, high: 0.1, key: model.weight_decay}
"""


def tune_argv(model_path: str, results_dir: Path, name: str, *extra: str, max_steps: int = 6, interval: int = 2) -> list[str]:
    """`python tune.py ...` on the tiny model with a tiny budget; no evaluator, no W&B, no plots."""
    results_dir.parent.mkdir(parents=True, exist_ok=True)
    space = results_dir.parent / f"{name}-space.yaml"
    space.write_text(SPACE)
    return [
        sys.executable, str(ROOT / "tune.py"),
        "--model.model_name_or_path", model_path,
        "--data.num_generated", "160", "--data.eval_size", "16", "--data.num_validation_problems", "8", "--data.max_length", "128",
        "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", str(interval), "--trainer.enable_progress_bar", "false",
        "--budget.examples", "null", "--budget.eval_every_examples", "null", "--study.pruner.min_resource", "null",
        "--evaluator.enabled", "false", "--wandb.enabled", "false",
        "--study.name", name, "--study.results_dir", str(results_dir), "--study.search_space", str(space),
        "--study.plots", "false", "--study.sampler.n_startup_trials", "2", "--study.pruner.enabled", "false",
        *extra,
    ]


def tune_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


def start_workers(argvs: list[list[str]], cwd: Path, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start every worker before waiting for any: they race for the study from the first instant."""
    logs = [open(cwd / f"worker-{i}.log", "w") for i in range(len(argvs))]  # noqa: SIM115 (closed by finish_workers)
    return [subprocess.Popen(argv, cwd=cwd, env=env or tune_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
            for argv, log in zip(argvs, logs)]


def finish_workers(procs: list[subprocess.Popen], cwd: Path, timeout_s: float) -> list[str]:
    """Wait for the workers; their outputs. A worker still running at the deadline is a failure."""
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [(cwd / f"worker-{i}.log").read_text() for i in range(len(procs))]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    return outputs


def worker_pids(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    return {t.user_attrs[storage_mod.WORKER_ATTR]["pid"] for t in trials}


# ---- creating the study together --------------------------------------------------------------


def _open_together(url: str, barrier: Any, locked: bool, out: Any) -> None:
    try:
        barrier.wait()
        if locked:
            with storage_mod.study_lock(url, "together"):
                storage = storage_mod.open_storage(url, heartbeat_interval_s=None)
                study = storage_mod.load_or_create(storage, "together", "minimize")
        else:
            storage = storage_mod.open_storage(url, heartbeat_interval_s=None)
            study = storage_mod.load_or_create(storage, "together", "minimize")
        out.put(("ok", storage.get_study_id_from_name(study.study_name)))
    except BaseException as err:  # reported to the test, which shows it
        out.put(("error", repr(err)))


@pytest.mark.parametrize("locked", [False, True], ids=["racing", "under-the-study-lock"])
def test_workers_opening_a_new_study_at_the_same_instant_share_one(tmp_path, locked):
    """Four processes released by one barrier open a storage file that does not exist yet.

    Unguarded, about half such starts fail in Optuna's first-time table creation ("table
    studies already exists"); three fresh files make a regression show.
    """
    ctx = mp.get_context("fork")
    for attempt in range(3):
        url = sqlite_url(tmp_path / f"attempt-{attempt}")
        (tmp_path / f"attempt-{attempt}").mkdir()
        barrier, out = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_open_together, args=(url, barrier, locked, out)) for _ in range(4)]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        assert all(kind == "ok" for kind, _ in results), results
        assert len({study_id for _, study_id in results}) == 1
        assert optuna.get_all_study_names(storage=url) == ["together"]


# ---- the sampler ------------------------------------------------------------------------------


def test_workers_with_one_seed_propose_different_points_and_trial_numbers_reproduce_them(tmp_path):
    url = sqlite_url(tmp_path)

    def propose(study: optuna.Study) -> tuple[int, float]:
        trial = study.ask()
        return trial.number, trial.suggest_float("x", 0.0, 1.0)

    # Two workers with the same study.seed, asking at the same time (neither has finished a trial).
    a = optuna.create_study(study_name="s", storage=url, sampler=TrialSeededTPESampler(seed=0, n_startup_trials=5))
    b = optuna.load_study(study_name="s", storage=url, sampler=TrialSeededTPESampler(seed=0, n_startup_trials=5))
    first_a, first_b = propose(a), propose(b)
    assert first_a[0] != first_b[0] and first_a[1] != first_b[1]
    # The same seed and trial number give the same point in another study: a rerun reproduces a run.
    c = optuna.create_study(study_name="t", storage=url, sampler=TrialSeededTPESampler(seed=0, n_startup_trials=5))
    assert [propose(c), propose(c)] == [first_a, first_b]


# ---- two tune.py workers ------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_started_together_share_one_sqlite_study(tiny_model_path, tmp_path):
    results = tmp_path / "results"
    argv = tune_argv(tiny_model_path, results, "pair", "--study.n_trials", "4", "--study.save_best_model", "true", max_steps=8)
    procs = start_workers([argv, argv], tmp_path)
    outputs = finish_workers(procs, tmp_path, timeout_s=300)

    assert optuna.get_all_study_names(storage=sqlite_url(results)) == ["pair"]
    trials = optuna.load_study(study_name="pair", storage=sqlite_url(results)).trials
    # Exactly n_trials, numbered without gaps or repeats, all finished.
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert len(storage_mod.counted(trials)) == 4
    # Both workers took part, and no point was proposed twice.
    assert worker_pids(trials) == {p.pid for p in procs}, outputs
    assert len({t.params["learning_rate"] for t in trials}) == 4
    # The report is the whole study's, whoever wrote it last; the best model is the study's best.
    data = yaml.safe_load((results / "study_results.yaml").read_text())
    assert [r["number"] for r in data["trials"]] == [0, 1, 2, 3]
    assert data["counts"] == {"complete": 4} and data["counted"] == 4
    best = min(trials, key=lambda t: t.value)
    assert data["best_trial"] == best.number
    marker = yaml.safe_load((results / "best_model" / "lit_sft_trial.json").read_text())
    assert marker["trial"] == best.number
    assert not list(results.glob(".best_model.*-*")), "staging folders left behind"
    assert data["disk"]["weight_files_bytes"] == 0 and data["disk"]["best_model_bytes"] > 0
    # Each worker said how far the study was when it started.
    assert any("0 of 4 trials so far" in out for out in outputs)


# ---- the journal file storage -------------------------------------------------------------------


def test_a_journal_study_resumes_and_finds_dead_workers_without_a_heartbeat(tiny_model_path, tmp_path):
    """The journal has no heartbeat: a dead worker of this machine is found by its process."""
    from lit_sft.study import run
    from tests.helpers import small_cfg

    journal = tmp_path / "study.log"
    url = f"journal://{journal}"
    (tmp_path / "space.yaml").write_text(SPACE)
    cfg = small_cfg(tiny_model_path, tmp_path, trainer={"max_steps": 4, "val_check_interval": 2})
    cfg["study"] = {"n_trials": 1, "name": "j", "storage": url, "results_dir": str(tmp_path / "results"),
                    "search_space": str(tmp_path / "space.yaml"), "plots": False, "save_best_model": False,
                    "sampler": {"n_startup_trials": 2}, "pruner": {"enabled": False}}
    run.tune(cfg)
    # A worker of this machine died in the middle of a trial.
    storage = storage_mod.open_storage(url, heartbeat_interval_s=None)
    study = optuna.load_study(study_name="j", storage=storage)
    orphan = study.ask()
    orphan.suggest_float("learning_rate", 1e-4, 5e-2, log=True)
    orphan.suggest_categorical("batch_size", [8, 16])
    orphan.suggest_float("weight_decay", 0.0, 0.1)
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan.set_user_attr(storage_mod.WORKER_ATTR, {**storage_mod.this_worker(), "pid": dead.pid, "start": "1"})

    cfg["study"]["n_trials"] = 3
    summary = run.tune(cfg)

    trials = optuna.load_study(study_name="j", storage=storage_mod.open_storage(url, heartbeat_interval_s=None)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[1].user_attrs["reason"] == "worker_died"
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert summary["counted"] == 3 and not (tmp_path / "study.log.study-lock").exists()  # released, and removed
