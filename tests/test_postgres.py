"""Workers on two "machines" sharing a study on a real PostgreSQL server, and no secret leaking.

The server is started by tests/postgres.py (initdb + pg_ctl on loopback, as an unprivileged user
when run as root); the test is skipped only where no PostgreSQL server binaries exist.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lit_sft import storage as storage_mod
from tests.postgres import postgres_server  # noqa: F401 (the fixture)
from tests.test_workers import (
    finish_workers,
    start_workers,
    tune_argv,
    tune_env,
    worker_pids,
)

PASSWORD = "pg-pass-Zx81q"
WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"


def _files_containing(folder: Path, needle: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_share_a_postgresql_study_and_no_secret_is_written(postgres_server, tiny_model_path, tmp_path):  # noqa: F811
    url = postgres_server.create_database("two_workers", password=PASSWORD)
    argvs = [
        # Separate results folders and W&B folders, as on two machines; one study in the server.
        tune_argv(tiny_model_path, tmp_path / f"machine-{i}" / "results", "shared", "--study.n_trials", "4",
                  "--study.storage", url, "--study.heartbeat_interval_s", "2",
                  "--wandb.enabled", "true", "--wandb.save_dir", str(tmp_path / f"machine-{i}" / "wandb"))
        for i in range(2)
    ]
    procs = start_workers(argvs, tmp_path, env=tune_env(WANDB_API_KEY=WANDB_KEY))
    outputs = finish_workers(procs, tmp_path, timeout_s=300)

    storage = storage_mod.open_storage(url, heartbeat_interval_s=None)
    assert optuna.get_all_study_names(storage=storage) == ["shared"]
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert worker_pids(trials) == {p.pid for p in procs}, outputs
    assert len({t.params["learning_rate"] for t in trials}) == 4
    # Each machine's report is built from the server: the last one written covers all 4 trials.
    reports = [yaml.safe_load((tmp_path / f"machine-{i}" / "results" / "study_results.yaml").read_text()) for i in range(2)]
    assert any(r["counts"] == {"complete": 4} for r in reports)
    assert all(r["storage"] == url.replace(PASSWORD, "***") for r in reports)
    # Secrets: masked on the console, absent from every file (results, W&B runs, logs).
    assert all("lit:***@127.0.0.1" in out for out in outputs)
    for secret in (PASSWORD, WANDB_KEY):
        assert _files_containing(tmp_path, secret) == []
    assert len(list(tmp_path.glob("machine-*/wandb/wandb/offline-run-*"))) == 4  # W&B did record runs
