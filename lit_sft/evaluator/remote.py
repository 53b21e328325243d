"""RemoteEvaluatorClient: the training side of a shared evaluator server (`server.py`).

It has EvaluatorClient's interface (start, post, poll, wait, cancel, stop), so the checkpoint
poster, the tuner and the final test use either without knowing which. Posting and polling never
block training: a post is one small message on an open socket, a poll reads only what is there.

The transport is `multiprocessing.connection` over TCP with its HMAC challenge-response on a
shared key (`keys.py`). Messages, client to server: {"kind": "hello", ...} once, then
{"kind": "job", ...}, {"kind": "cancel", "jobs": [...]}, {"kind": "bye"}; or {"kind": "status"}
alone. Server to client: {"kind": "welcome", "server": {...}} or {"kind": "refused", "error"},
then {"kind": "ready", ...} when the engine has loaded and {"kind": "result", "result": {...}}
per job.

Faults: a server that goes away (killed, restarted) turns this client's unanswered jobs into
`missing` results with one EvaluatorWarning; the next post connects again, so a server restarted
on the same address serves the very next checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterable, Sequence
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from multiprocessing.connection import wait as wait_any
from typing import Any

from lit_sft.errors import UserError
from lit_sft.evaluator.client import EvaluatorWarning, StartStop
from lit_sft.evaluator.keys import load_key, parse_address
from lit_sft.evaluator.worker import blank_result, job_message

SETS = ("validation", "test")
"""The problem sets a job can name: the validation problems, or the final test's."""
REPLY_TIMEOUT_S = 30.0
"""How long the handshake and the hello's answer may take (the server answers from a thread of
its own, even while it generates)."""
_RETRY_S = 1.0
_REPOST_CONNECT_TIMEOUT_S = 5.0


class ServerRefused(UserError):
    """The server answered and said no: wrong key, other model or problems."""


class ServerUnreachable(ConnectionError):
    """Nobody answered at the address (not started yet, killed, restarting)."""


def problems_digest(problems: Sequence[tuple[str, str]]) -> str:
    """A fingerprint of (prompt, answer) pairs, the same on every machine and Python."""
    return hashlib.sha256(json.dumps([list(p) for p in problems]).encode()).hexdigest()[:16]


def model_identity(model_path: str) -> str:
    """The model as both sides name it: a folder's real path, else the hub id as written."""
    return os.path.realpath(model_path) if os.path.isdir(model_path) else str(model_path)


def connect(address: str, key: bytes, timeout_s: float = REPLY_TIMEOUT_S) -> Connection:
    """An authenticated connection to the server; ServerUnreachable, or ServerRefused on a wrong key.

    `multiprocessing.connection.Client` has no timeout; this is its socket path with one, so an
    unreachable host costs `timeout_s`, not the kernel's minutes.
    """
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as err:
        raise ServerUnreachable(f"no evaluator server answers at {address} ({err.strerror or err})") from err
    sock.setblocking(True)
    conn = Connection(sock.detach())
    try:
        if not conn.poll(timeout_s):
            raise ServerUnreachable(f"the evaluator server at {address} did not start the handshake in {timeout_s:g} s")
        answer_challenge(conn, key)
        deliver_challenge(conn, key)
    except AuthenticationError as err:
        conn.close()
        raise ServerRefused(
            f"evaluator.address: the evaluator server at {address} refused the key (LIT_SFT_EVALUATOR_KEY or "
            "evaluator.key_file must hold the server's key)"
        ) from err
    except (EOFError, OSError) as err:
        conn.close()
        raise ServerUnreachable(f"the evaluator server at {address} closed the connection during the handshake") from err
    except ServerUnreachable:
        conn.close()
        raise
    return conn


def request(conn: Connection, message: dict[str, Any], address: str, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
    """Send one message and return the server's answer (ServerUnreachable if none comes)."""
    try:
        conn.send(message)
        if conn.poll(timeout_s):
            return conn.recv()
    except (EOFError, OSError) as err:
        raise ServerUnreachable(f"the evaluator server at {address} went away") from err
    raise ServerUnreachable(f"the evaluator server at {address} did not answer in {timeout_s:g} s")


def hello(model_path: str, sets: dict[str, Sequence[tuple[str, str]]], max_new_tokens: int, name: str | None = None) -> dict[str, Any]:
    """The first message: who is asking, and what the server must be grading for them."""
    return {
        "kind": "hello",
        "name": name or f"{socket.gethostname()}:{os.getpid()}",
        "pid": os.getpid(),
        "model": model_identity(model_path),
        "sets": {k: {"digest": problems_digest(v), "count": len(v)} for k, v in sets.items()},
        "max_new_tokens": int(max_new_tokens),
    }


def open_session(address: str, key: bytes, greeting: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S) -> tuple[Connection, dict[str, Any]]:
    """Connect, say hello; the connection and the server's description, or ServerRefused."""
    conn = connect(address, key, timeout_s)
    try:
        answer = request(conn, greeting, address, timeout_s)
    except ServerUnreachable:
        conn.close()
        raise
    if answer.get("kind") == "refused":
        conn.close()
        raise ServerRefused(f"evaluator.address: the evaluator server at {address} refused this run: {answer['error']}")
    return conn, answer["server"]


def client_sets(cfg: dict[str, Any], test: bool) -> dict[str, list[tuple[str, str]]]:
    """The problem sets a run of `cfg` asks the server for, cut as the evaluator cuts them."""
    from lit_sft.data import SFTDataModule

    data = SFTDataModule(**cfg["data"])
    sets = {"validation": [(p.prompt, p.answer) for p in data.validation_problems[: int(cfg["evaluator"]["num_problems"])]]}
    if test:
        tests = data.test_problems
        if tests:
            sets["test"] = [(p.prompt, p.answer) for p in tests]
    return sets


def check_server(cfg: dict[str, Any], *, test: bool = False) -> None:
    """With evaluator.address: the server answers, takes our key, and grades our model and
    problems (the final test's too with `test`). UserError otherwise: before any trial or run.

    A server still starting is waited for up to evaluator.connect_timeout_s.
    """
    evaluator = cfg.get("evaluator") or {}
    if not evaluator.get("enabled", True) or not evaluator.get("address"):
        return
    from lit_sft.weights import resolve_model_path

    address = str(evaluator["address"])
    key = load_key(evaluator.get("key_file"))
    greeting = hello(resolve_model_path(cfg["model"]["model_name_or_path"]), client_sets(cfg, test), evaluator["max_new_tokens"])
    deadline = time.monotonic() + float(evaluator.get("connect_timeout_s", 60.0))
    while True:
        try:
            conn, _ = open_session(address, key, {**greeting, "name": f"{greeting['name']} (check)"})
        except ServerUnreachable as err:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"evaluator.address: {err} within evaluator.connect_timeout_s "
                    f"(start it: python -m lit_sft.evaluator serve --config CONFIG --evaluator.address {address})"
                ) from err
            time.sleep(_RETRY_S)
            continue
        with _closing(conn):
            conn.send({"kind": "bye"})
        return


class _closing:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


class RemoteEvaluatorClient(StartStop):
    """Posts checkpoints to a shared evaluator server; collects results without blocking."""

    device = "remote"
    """Not this machine's concern: training keeps all its threads (see training._share_cpu_with)."""

    def __init__(
        self,
        address: str,
        key: bytes,
        model_path: str,
        problems: Sequence[tuple[str, str]],
        problem_set: str = "validation",
        max_new_tokens: int = 256,
        connect_timeout_s: float = 60.0,
        delete_files: bool = True,
        name: str | None = None,
    ) -> None:
        """
        Args:
            problem_set: which of the server's sets every job is graded on (`validation`, `test`).
            delete_files: the posted files are ours to lose: the server deletes those still
                queued when this client dies (the poster's checkpoints; not the best model).
        """
        if problem_set not in SETS:
            raise ValueError(f"problem_set must be one of {SETS}, got {problem_set!r}")
        self.address = str(address)
        self.problem_set = problem_set
        self.delete_files = delete_files
        self.connect_timeout_s = float(connect_timeout_s)
        self._key = key
        self._greeting = hello(model_path, {problem_set: list(problems)}, max_new_tokens, name)
        self._conn: Connection | None = None
        self._outstanding: dict[int, dict[str, Any]] = {}
        self._cancelled: set[int] = set()
        self._finished: list[dict[str, Any]] = []
        self._next_job = 0
        self._connected_once = False
        self._down_warned = False
        self._last_error: str | None = None
        self.server: dict[str, Any] | None = None
        """The server's description from its welcome: pid, backend, device, model, ready."""
        self.ready_info: dict[str, Any] | None = None
        """The server's engine once loaded (its "ready" message or a welcome saying ready)."""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect unless connected. The first time, wait up to connect_timeout_s for a server
        that is starting, and raise UserError if it refuses or never answers; later, try once
        and, if nobody answers, leave the jobs to come back as missing (training goes on)."""
        if self._conn is not None:
            return
        if self._connected_once:
            try:
                self._open(_REPOST_CONNECT_TIMEOUT_S)
            except (ServerUnreachable, UserError) as err:
                self._gone(str(err))
            return
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                self._open(REPLY_TIMEOUT_S)
                return
            except ServerUnreachable as err:
                if time.monotonic() >= deadline:
                    raise UserError(f"evaluator.address: {err} within evaluator.connect_timeout_s") from err
                time.sleep(_RETRY_S)

    def _open(self, timeout_s: float) -> None:
        self._conn, self.server = open_session(self.address, self._key, self._greeting, timeout_s)
        if self.server.get("ready"):
            self.ready_info = self.server
        if self._down_warned:
            warnings.warn(f"evaluator server at {self.address} answers again (pid {self.server.get('pid')})", EvaluatorWarning, stacklevel=3)
        self._connected_once = True
        self._down_warned = False

    @property
    def pid(self) -> int | None:
        """The server's process id while connected."""
        return self.server.get("pid") if self._conn is not None and self.server else None

    @property
    def ready(self) -> bool:
        self._drain()
        return self._conn is not None and self.ready_info is not None

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the server's engine has loaded (False after `timeout_s` or if it is gone)."""
        deadline = time.monotonic() + timeout_s
        while not self.ready and self._conn is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            wait_any([self._conn], timeout=remaining)
        return self.ready

    def stop(self) -> None:
        """Say goodbye (the server drops our queued jobs); unanswered jobs come back as missing."""
        if self._conn is None:
            return
        self._drain()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with _closing(conn):
            try:
                conn.send({"kind": "bye"})
            except OSError:
                pass
        self._record_missing(f"evaluation not finished when this run stopped using the server at {self.address}")

    # -- jobs ------------------------------------------------------------------------------------

    def post(self, run: str, step: int, examples_seen: int, path: str) -> int:
        """Send a checkpoint to the server; its job id at once. With no server, a missing result."""
        job = job_message(self._next_job, run, step, examples_seen, path, problems=self.problem_set, delete=self.delete_files)
        self._next_job += 1
        self._drain()
        if self._conn is None:
            self.start()
        if self._conn is None:
            self._finished.append(blank_result(job, "missing", self._last_error or "no evaluator server"))
            return job["job"]
        self._outstanding[job["job"]] = job
        try:
            self._conn.send(job)
        except OSError:
            self._gone(f"the evaluator server at {self.address} went away")
        return job["job"]

    def _pending(self) -> dict[int, dict[str, Any]] | None:
        return None if self._conn is None else self._outstanding

    def _waitables(self) -> list[Any]:
        return [self._conn]

    def cancel(self, jobs: Iterable[int]) -> None:
        """Give up on these jobs (ours only): the server skips them if not started."""
        ids = set(jobs) & self._outstanding.keys()
        for job_id in ids:
            del self._outstanding[job_id]
        self._cancelled |= ids
        if ids and self._conn is not None:
            try:
                self._conn.send({"kind": "cancel", "jobs": sorted(ids)})
            except OSError:
                self._gone(f"the evaluator server at {self.address} went away")

    @property
    def outstanding(self) -> list[int]:
        return sorted(self._outstanding)

    # -- internals -------------------------------------------------------------------------------

    def _drain(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            while conn.poll(0):
                self._handle(conn.recv())
        except (EOFError, OSError):
            self._gone(f"the evaluator server at {self.address} went away")

    def _handle(self, message: dict[str, Any]) -> None:
        if message["kind"] == "ready":
            self.ready_info = message
        elif message["kind"] == "result":
            result = message["result"]
            if result["job"] in self._cancelled:
                self._cancelled.discard(result["job"])
            elif self._outstanding.pop(result["job"], None) is not None:
                self._finished.append(result)

    def _gone(self, why: str) -> None:
        """The server is gone: its unanswered jobs are missing; one warning per outage."""
        lost = len(self._outstanding)
        self._last_error = why
        if self._conn is not None:
            with _closing(self._conn):
                pass
            self._conn = None
        self.ready_info = None
        self._record_missing(f"{why} before answering")
        if not self._down_warned:
            self._down_warned = True
            warnings.warn(
                f"{why}; {lost} evaluation(s) recorded as missing; training goes on and the next checkpoint "
                "tries the server again",
                EvaluatorWarning,
                stacklevel=4,
            )

    def _record_missing(self, reason: str) -> None:
        for job in self._outstanding.values():
            self._finished.append(blank_result(job, "missing", reason))
        self._outstanding.clear()
