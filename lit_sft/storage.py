"""Where a study lives, and what keeps it whole when workers share it, die or restart.

Optuna's storages do the storing: RDBStorage on a SQLite file (one machine; the default) or on
PostgreSQL (many machines), or JournalStorage on a file. This module adds the four things a
long, shared study needs and Optuna leaves to the caller:

- opening a storage so that it fails fast, in one line, with the URL's password masked;
- a lock per study (a file lock beside a SQLite or journal file, a PostgreSQL advisory lock)
  under which a worker recovers dead trials, counts the study's trials and creates the next
  one, so that workers started together neither overshoot `n_trials` nor retry a trial twice;
- detection of trials whose worker died: Optuna's heartbeat (RDB storages) for any machine,
  and at once, without waiting out the heartbeat's grace period, for workers of this machine
  whose process is gone (each trial records its worker's host and process);
- retries: a trial whose worker died or was interrupted is re-queued with the same parameters
  (up to `max_retries` times), and only the retry counts towards `n_trials`.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lit_sft import secrets
from lit_sft.errors import UserError

log = logging.getLogger(__name__)

SCHEMES = ("sqlite", "postgresql", "journal")
"""Storage URL schemes the tuner supports (a driver may follow: postgresql+psycopg2://)."""
SQLITE_BUSY_TIMEOUT_S = 60
"""How long a SQLite writer waits for another worker's write. Measured with 4 processes creating
trials as fast as they can: 0 errors with it, 62 of 160 trials broken ("database is locked",
some left RUNNING) with SQLite's default of 5 ms."""
CONNECT_TIMEOUT_S = 10
"""A PostgreSQL server that does not answer: give up after this long, not the OS's minutes."""
WORKER_ATTR = "worker"
"""User attribute of a trial: the host and process running it."""
RETRYABLE = ("worker_died", "interrupted")
"""Failure reasons that say nothing about the parameters: such trials are run again."""
_OPEN_ATTEMPTS = 5


# ---- URLs -----------------------------------------------------------------------------------


def scheme(url: str) -> str:
    """`postgresql` for `postgresql+psycopg2://...`; '' when there is none."""
    return url.split(":", 1)[0].split("+", 1)[0].lower() if ":" in url else ""


def journal_path(url: str) -> Path:
    """The file of `journal:///abs/file.log` or `journal://relative/file.log`."""
    return Path(url.split(":", 1)[1].removeprefix("//"))


def _sqlite_path(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def url_problem(url: str) -> str | None:
    """Why `url` cannot hold a shared, lasting study, or None."""
    kind = scheme(url)
    if kind not in SCHEMES:
        return (f"study.storage: unsupported URL {secrets.mask_url(url)!r}: use sqlite:///file.db (one machine), "
                "postgresql://user@host/db (several machines) or journal:///file.log")
    if kind == "sqlite":
        try:
            path = _sqlite_path(url)
        except Exception as err:  # sqlalchemy's URL parser: ArgumentError and friends
            return f"study.storage: cannot parse {secrets.mask_url(url)!r}: {err}"
        if path is None:
            return "study.storage: an in-memory SQLite study ends with its process; give a file: sqlite:///path/optuna.db"
    if kind == "journal" and not str(journal_path(url)):
        return "study.storage: journal URL without a file: journal:///path/journal.log"
    return None


# ---- opening --------------------------------------------------------------------------------


def engine_url(url: str) -> str:
    """`url` with a PostgreSQL driver that is installed: a bare `postgresql://` means psycopg 3 to
    SQLAlchemy 2.1, while the `postgres` extra installs psycopg2."""
    from lit_sft.available import has_module

    if url.startswith("postgresql://") and not has_module("psycopg") and has_module("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _connect_args(url: str) -> dict[str, Any]:
    if scheme(url) == "sqlite":
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    if "connect_timeout" in url:
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_S}


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return secrets.mask(lines[0] if lines else type(err).__name__)


def check_connection(url: str) -> None:
    """Connect once, so an unreachable server or a missing driver is one clear line, at once."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    shown = secrets.mask_url(url)
    try:
        engine = sqlalchemy.create_engine(engine_url(url), connect_args=_connect_args(url), poolclass=NullPool)
    except ModuleNotFoundError as err:
        raise UserError(f"study.storage: {shown} needs the {err.name} driver: pip install -e '.[postgres]'") from err
    except Exception as err:
        raise UserError(f"study.storage: bad URL {shown}: {_first_line(err)}") from err
    try:
        with engine.connect():
            pass
    except Exception as err:
        raise UserError(f"study.storage: cannot connect to {shown}: {_first_line(err)}") from err
    finally:
        engine.dispose()


def open_storage(url: str, *, heartbeat_interval_s: int | None) -> optuna.storages.BaseStorage:
    """The study's storage. RDB storages get Optuna's heartbeat (a running trial that stops
    beating for 3 intervals is stale, whoever ran it) and a SQLite busy timeout."""
    if scheme(url) == "journal":
        return _open_journal(journal_path(url))
    if scheme(url) == "sqlite":
        path = _sqlite_path(url)
        if path is not None and not path.parent.is_dir():
            raise UserError(f"study.storage: folder of {url} does not exist: {path.parent}")
    check_connection(url)
    hb = heartbeat_interval_s
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat: stable since 2.9
                return optuna.storages.RDBStorage(
                    engine_url(url), engine_kwargs={"connect_args": _connect_args(url)},
                    heartbeat_interval=hb, grace_period=3 * hb if hb else None,
                )
        except Exception as err:
            # Workers opening a new database together race to create its tables; the loser's
            # error goes away when it looks again.
            if attempt == _OPEN_ATTEMPTS - 1:
                raise UserError(f"study.storage: cannot open {secrets.mask_url(url)}: {_first_line(err)}") from err
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")


def _open_journal(path: Path) -> optuna.storages.BaseStorage:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not path.parent.is_dir():
        raise UserError(f"study.storage: folder of journal file does not exist: {path.parent}")
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise UserError(f"study.storage: cannot open journal file {path}: {err.strerror or err}") from err


def load_or_create(storage: optuna.storages.BaseStorage, name: str, direction: str, **kwargs: Any) -> optuna.Study:
    """Load the study, or create it; a worker that loses the race to create it loads it."""
    try:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)
    except KeyError:
        pass
    try:
        return optuna.create_study(study_name=name, storage=storage, direction=direction, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, **kwargs)


# ---- the study lock -------------------------------------------------------------------------


class FileLock(AbstractContextManager):
    """An exclusive `flock` on a file: for storages that live in a file of this machine.

    The file is removed on release, so no empty lock files stay beside the results. A waiter
    may have opened the file just before that: once it holds the lock it sees that its file is
    no longer the one at the path, and locks the path again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
            if self._still_at_path(fd):
                self._fd = fd
                return self
            os.close(fd)

    def _still_at_path(self, fd: int) -> bool:
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            Path(self.path).unlink(missing_ok=True)  # while held: no one holds the file at the path
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class PostgresLock(AbstractContextManager):
    """A PostgreSQL session advisory lock, keyed by study: shared by every machine on the server.

    Held on a connection of its own, so a worker that dies releases it with its connection.
    """

    def __init__(self, url: str, study_name: str) -> None:
        self.url = url
        digest = hashlib.sha256(f"lit-sft:{study_name}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self._engine: Any = None
        self._connection: Any = None

    def __enter__(self) -> PostgresLock:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            check_connection(self.url)  # a clear error at the first lock, which comes before any storage use
            self._engine = sqlalchemy.create_engine(engine_url(self.url), connect_args=_connect_args(self.url), poolclass=NullPool)
        self._connection = self._engine.connect()
        self._connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
        return self

    def __exit__(self, *exc: object) -> None:
        import sqlalchemy

        if self._connection is not None:
            try:
                self._connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            finally:
                self._connection.close()
                self._connection = None


def study_lock(url: str, study_name: str) -> AbstractContextManager:
    """The lock every worker of the study takes to recover, count and create trials."""
    kind = scheme(url)
    if kind == "postgresql":
        return PostgresLock(url, study_name)
    path = journal_path(url) if kind == "journal" else _sqlite_path(url)
    assert path is not None, "url_problem() rejects in-memory studies"
    # Not `<file>.lock`: JournalFileBackend's own lock is a symlink of that name.
    return FileLock(path.with_name(f"{path.name}.study-lock"))


# ---- workers --------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _machine() -> str:
    """This host as the processes on it see it: host name, boot, PID namespace.

    Two containers with one host name, or a machine that rebooted, are different machines:
    their process ids mean nothing here.
    """
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id')}|{namespace}"


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), None if no such live process.

    Compared with the recorded one, it tells a dead worker from a new process that got its pid.
    """
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        if Path("/proc/self/stat").exists():
            return None
        try:  # no /proc (macOS): existence is all we can learn
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return None
    return fields[19]


def this_worker() -> dict[str, Any]:
    """What a trial records about the process running it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "machine": _machine(), "start": _process_start(pid)}


def worker_alive(info: Any) -> bool | None:
    """Whether the worker `info` (from `this_worker`) still runs; None if it ran elsewhere."""
    if not isinstance(info, dict) or info.get("machine") != _machine():
        return None
    start = _process_start(int(info["pid"]))
    if start is None:
        return False
    recorded = info.get("start")
    return recorded in (None, "?") or start == "?" or start == recorded


# ---- counting and recovery ------------------------------------------------------------------


def retried_numbers(trials: Iterable[FrozenTrial]) -> set[int]:
    """Numbers of the trials that another trial retries (in Optuna's retry_history attribute)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use up `n_trials`: all but queued ones and failures that were retried."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.state != TrialState.WAITING and not (t.state == TrialState.FAIL and t.number in retried)]


def retryable(trial: FrozenTrial) -> bool:
    """Failed for a reason outside the trial: its worker died or was interrupted.

    A trial that Optuna's heartbeat check failed carries no reason of ours (its worker could not
    write one), so a failure without one is a stale trial too.
    """
    if trial.state != TrialState.FAIL:
        return False
    attrs = trial.user_attrs
    return attrs.get("reason") in RETRYABLE or ("reason" not in attrs and "error" not in attrs)


def retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue `trial`'s parameters again as a new WAITING trial.

    Optuna's RetryHeartbeatStaleTrialCallback does the same for heartbeat-stale trials, and the
    same system attributes (failed_trial, retry_history) are written so its helpers still work;
    it is not used itself because it copies the failed trial's user attributes (its error and
    its dead worker) onto the retry.
    """
    history = [*trial.system_attrs.get("retry_history", ()), trial.number]
    system_attrs = {"failed_trial": trial.system_attrs.get("failed_trial", trial.number), "retry_history": history}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"retry_of": trial.number}, system_attrs=system_attrs,
    ))


_given_up: set[tuple[str, int]] = set()
"""(study, trial) whose retries are exhausted and that this process has said so about."""


def _fail_dead_workers(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[str]:
    notes = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        info = trial.user_attrs.get(WORKER_ATTR)
        if worker_alive(info) is not False:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        error = f"its worker (pid {info['pid']} on {info['host']}) died while running it"
        try:
            storage.set_trial_user_attr(trial_id, "reason", "worker_died")
            storage.set_trial_user_attr(trial_id, "error", error)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile after all
        notes.append(f"trial {trial.number}: {error}")
    return notes


def recover(study: optuna.Study, storage: optuna.storages.BaseStorage, max_retries: int) -> list[str]:
    """Fail the trials whose worker is gone and queue retries; call under `study_lock`.

    Returns one line per trial failed or retried, for the console.
    """
    notes = _fail_dead_workers(study, storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat: workers of any machine
    trials = study.get_trials(deepcopy=False)
    done = retried_numbers(trials)
    for trial in trials:
        if not retryable(trial) or trial.number in done:
            continue
        tries = len(trial.system_attrs.get("retry_history", ())) + 1
        if tries > max_retries:
            if (study.study_name, trial.number) not in _given_up:  # said once per process, not before every trial
                _given_up.add((study.study_name, trial.number))
                notes.append(f"trial {trial.number}: not retried, it failed {tries} times (study.max_retries={max_retries})")
            continue
        retry(study, trial)
        notes.append(f"trial {trial.number}: queued again with the same parameters (retry {tries} of {max_retries})")
    return notes


class Heartbeat(AbstractContextManager):
    """Records a running trial's heartbeat every interval, on RDB storages with one set.

    What `Study.optimize` does for its trials; the tuner creates its trials itself (under the
    study lock), so it beats them itself, through the storage's public `record_heartbeat`.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        self.storage = storage
        self.trial_id = trial_id
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if not isinstance(self.storage, optuna.storages.RDBStorage):
            return self
        interval = self.storage.get_heartbeat_interval()
        if interval:
            self.storage.record_heartbeat(self.trial_id)
            self._thread = threading.Thread(target=self._beat, args=(interval,), name="lit-sft-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self, interval: int) -> None:
        while not self._stop.wait(interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as err:  # a database hiccup must not end a trial; the next beat may pass
                log.warning("heartbeat of trial id %d failed: %s", self.trial_id, _first_line(err))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
