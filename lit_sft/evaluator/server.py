"""The shared evaluator server: one engine, built once, grading the checkpoints of many trainers.

`python -m lit_sft.evaluator serve --config CONFIG --evaluator.address HOST:PORT` (see
`__main__`). Its `evaluator` and `data` sections decide the model, backend, device and the two
problem sets a job may name: `validation` (the first evaluator.num_problems) and `test` (the final
test's). Clients are `RemoteEvaluatorClient`s (`remote.py`, which documents the messages).

Threads: one accepts connections; one per client runs the handshake and reads its messages into
that client's queue; the main thread owns the engine and runs one job at a time (load weights,
generate, grade: never interleaved with another job), taking the clients' queues in turn (round
robin), so one trainer's backlog never starves another. A client's cancel or goodbye touches only
its own queue. A client that disconnects without a goodbye (killed) has its queued jobs dropped
and their weight files deleted. Results have the worker's shape plus `queued_s`, the seconds the
job waited in its queue before the engine took it.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any, Callable

from lit_sft.errors import UserError
from lit_sft.evaluator import worker
from lit_sft.evaluator.keys import parse_address
from lit_sft.evaluator.remote import problems_digest

_HANDSHAKE_TIMEOUT_S = 10.0
_IDLE_WAIT_S = 0.5
_BACKLOG = 64


@dataclass
class _Client:
    """One connected trainer and its own queue."""

    id: int
    name: str
    conn: Connection
    sets: set[str]
    """The problem sets its hello was checked against: the only ones its jobs may name."""
    queue: deque = field(default_factory=deque)
    served: int = 0
    waited_s: float = 0.0
    alive: bool = True
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class EvaluatorServer:
    """Serves jobs from authenticated clients on one engine; see the module docstring."""

    def __init__(
        self,
        spec: worker.WorkerSpec,
        sets: dict[str, list[tuple[str, str]]],
        model: str,
        address: str,
        key: bytes,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.sets = {name: problems for name, problems in sets.items() if problems}
        self.model = model
        self.address = address
        self._key = key
        self._log = log or (lambda line: print(f"evaluator server: {line}", flush=True))
        self._cond = threading.Condition()
        self._clients: dict[int, _Client] = {}
        self._order: list[int] = []
        """Client ids in arrival order; the round robin walks it from after the last one served."""
        self._last_served: int = -1
        self._next_id = 0
        self._running: dict[str, Any] | None = None
        self._served = 0
        self._waited_s = 0.0
        self._started = time.time()
        self._listener: Listener | None = None
        self.ready_info: dict[str, Any] | None = None
        self._closed = False

    # -- network ---------------------------------------------------------------------------------

    def bind(self) -> None:
        """Listen on the address (before the engine loads: clients can connect and be checked)."""
        host, port = parse_address(self.address)
        try:
            # No authkey here: each connection's handshake runs in its own thread, so a client
            # that connects and says nothing cannot hold up everyone else's accept.
            self._listener = Listener((host, port), family="AF_INET", backlog=_BACKLOG)
        except OSError as err:
            raise UserError(f"evaluator.address: cannot listen on {host}:{port}: {err.strerror or err}") from err
        threading.Thread(target=self._accept_loop, name="evaluator-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                conn = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                continue
            threading.Thread(target=self._session, args=(conn,), name="evaluator-client", daemon=True).start()

    def _session(self, conn: Connection) -> None:
        """One connection: handshake, then a status query or a client's messages until it leaves."""
        try:
            self._authenticate(conn)
            first = conn.recv() if conn.poll(_HANDSHAKE_TIMEOUT_S) else None
        except AuthenticationError:
            self._log("refused a connection: wrong key")
            conn.close()
            return
        except (EOFError, OSError):
            conn.close()
            return
        if not isinstance(first, dict) or first.get("kind") not in ("status", "hello"):
            conn.close()
            return
        if first["kind"] == "status":
            self._send(conn, threading.Lock(), {"kind": "status", **self.status()})
            conn.close()
            return
        try:
            client = self._welcome(conn, first)
        except (KeyError, TypeError, ValueError, AttributeError):
            self._send(conn, threading.Lock(), {"kind": "refused", "error": "malformed hello (a client of another lit-sft version?)"})
            conn.close()
            return
        if client is not None:
            self._read(client)

    def _authenticate(self, conn: Connection) -> None:
        # The challenge-response Listener.accept would run, bounded in time.
        deliver_challenge(conn, self._key)
        if not conn.poll(_HANDSHAKE_TIMEOUT_S):
            raise EOFError("no challenge from the client")
        answer_challenge(conn, self._key)

    def _welcome(self, conn: Connection, hello: dict[str, Any]) -> _Client | None:
        problem = self._refusal(hello)
        if problem:
            self._log(f"refused {hello.get('name')}: {problem}")
            self._send(conn, threading.Lock(), {"kind": "refused", "error": problem})
            conn.close()
            return None
        with self._cond:
            client = _Client(id=self._next_id, name=str(hello["name"]), conn=conn, sets=set(hello["sets"]))
            self._next_id += 1
            self._clients[client.id] = client
            self._order.append(client.id)
            welcome = {"kind": "welcome", "server": self._describe()}
        self._log(f"client {client.name} connected ({', '.join(sorted(client.sets))} problems)")
        self._send(conn, client.send_lock, welcome)
        return client

    def _refusal(self, hello: dict[str, Any]) -> str | None:
        """Why this client's checkpoints cannot be graded here (None: they can)."""
        problems = []
        if hello.get("model") != self.model:
            problems.append(f"its model is {hello.get('model')}, the server's is {self.model} (give both the same model.model_name_or_path)")
        if int(hello.get("max_new_tokens", -1)) != self.spec.max_new_tokens:
            problems.append(f"its evaluator.max_new_tokens is {hello.get('max_new_tokens')}, the server's {self.spec.max_new_tokens}")
        for name, theirs in (hello.get("sets") or {}).items():
            ours = self.sets.get(name)
            if ours is None:
                problems.append(f"the server has no {name} problems")
            elif theirs.get("digest") != problems_digest(ours):
                problems.append(
                    f"its {name} problems differ ({theirs.get('count')} problems here, {len(ours)} on the server; "
                    "give both the same data section and evaluator.num_problems)"
                )
        return "; ".join(problems) or None

    def _read(self, client: _Client) -> None:
        """The client's messages into its queue, until it says goodbye or its connection drops."""
        try:
            while True:
                message = client.conn.recv()
                kind = message.get("kind")
                if kind == "bye":
                    self._drop(client, killed=False)
                    return
                if kind == "cancel":
                    self._cancel(client, set(message["jobs"]))
                elif kind == "job":
                    self._enqueue(client, message)
        except (EOFError, OSError):
            self._drop(client, killed=True)
        except Exception as err:  # noqa: BLE001 - a malformed message: this client is done, the server is not
            self._log(f"client {client.name} sent a malformed message ({type(err).__name__}); disconnecting it")
            self._drop(client, killed=True)

    def _enqueue(self, client: _Client, job: dict[str, Any]) -> None:
        if job.get("problems") not in client.sets:
            error = f"problem set {job.get('problems')!r} was not checked at connection (checked: {', '.join(sorted(client.sets))})"
            self._send(client.conn, client.send_lock, {"kind": "result", "result": worker.blank_result(job, "error", error)})
            return
        with self._cond:
            client.queue.append({**job, "arrived": time.monotonic()})
            self._cond.notify()

    def _cancel(self, client: _Client, ids: set[int]) -> None:
        with self._cond:
            client.queue = deque(j for j in client.queue if j["job"] not in ids)

    def _drop(self, client: _Client, killed: bool) -> None:
        """The client left: forget its queue; a killed client's files are nobody's now."""
        with self._cond:
            if not client.alive:
                return
            client.alive = False
            self._clients.pop(client.id, None)
            self._order.remove(client.id)
            dropped = list(client.queue)
            client.queue.clear()
        removed = sum(_remove(job) for job in dropped) if killed else 0
        how = "disconnected without a goodbye" if killed else "left"
        self._log(f"client {client.name} {how}: {len(dropped)} queued job(s) dropped, {removed} weight file(s) removed")
        try:
            client.conn.close()
        except OSError:
            pass

    @staticmethod
    def _send(conn: Connection, lock: threading.Lock, message: dict[str, Any]) -> bool:
        try:
            with lock:
                conn.send(message)
            return True
        except OSError:
            return False

    # -- engine ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Load the engine, then serve jobs until `stop` is set (or the process is stopped)."""
        stop = stop or threading.Event()
        backend = self._load()
        while not stop.is_set():
            taken = self._take(stop)
            if taken is None:
                continue
            client, job = taken
            result = worker.evaluate(backend, dataclasses.replace(self.spec, problems=self.sets[job["problems"]]), job)
            result["queued_s"] = job["queued_s"]  # a server result's one extra figure: its wait in the queue
            self._deliver(client, job, result)
            if not backend.healthy:
                # A failed swap left weights that are no file's; a fresh engine answers the next job.
                self._log("a weight load failed inside the engine; building it again")
                backend = None
                gc.collect()
                backend = self._load()

    def _load(self) -> Any:
        start = time.perf_counter()
        backend = worker.load_backend(self.spec)
        info = {"pid": os.getpid(), "backend": backend.name, "device": backend.device, "load_seconds": time.perf_counter() - start}
        with self._cond:
            self.ready_info = info
            clients = list(self._clients.values())
        for client in clients:
            self._send(client.conn, client.send_lock, {"kind": "ready", **info})
        self._log(f"engine ready: {backend.name} on {backend.device} in {info['load_seconds']:.1f} s")
        return backend

    def _take(self, stop: threading.Event) -> tuple[_Client, dict[str, Any]] | None:
        """The next job, round robin over the clients with queued jobs (None after a short idle wait)."""
        with self._cond:
            for _ in range(2):
                order = self._order
                if order:
                    after = next((i for i, cid in enumerate(order) if cid > self._last_served), 0)
                    for cid in order[after:] + order[:after]:
                        client = self._clients[cid]
                        if client.queue:
                            job = client.queue.popleft()
                            waited = job["queued_s"] = time.monotonic() - job.pop("arrived")
                            client.waited_s += waited
                            self._waited_s += waited
                            self._last_served = cid
                            self._running = {"client": client.name, "job": job["job"], "problems": job["problems"]}
                            return client, job
                if stop.is_set():
                    return None
                self._cond.wait(_IDLE_WAIT_S)
        return None

    def _deliver(self, client: _Client, job: dict[str, Any], result: dict[str, Any]) -> None:
        with self._cond:
            self._running = None
            self._served += 1
            client.served += 1
            alive = client.alive
        if not (alive and self._send(client.conn, client.send_lock, {"kind": "result", "result": result})):
            _remove(job)  # nobody is left to read its result or delete its file

    # -- status ----------------------------------------------------------------------------------

    def _describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "address": self.address, "model": self.model, "ready": self.ready_info is not None,
            "backend": self.spec.backend, "device": self.spec.device, "sets": {k: len(v) for k, v in self.sets.items()},
        }

    def status(self) -> dict[str, Any]:
        """What `python -m lit_sft.evaluator status` prints: queues per client, jobs served, waits."""
        with self._cond:
            clients = [
                {"name": c.name, "queued": len(c.queue), "served": c.served,
                 "mean_wait_s": c.waited_s / c.served if c.served else None}
                for c in (self._clients[i] for i in self._order)
            ]
            return {
                **self._describe(),
                "uptime_s": time.time() - self._started,
                "served": self._served,
                "mean_wait_s": self._waited_s / self._served if self._served else None,
                "running": self._running,
                "clients": clients,
            }

    def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        with self._cond:
            clients = list(self._clients.values())
        for client in clients:
            try:
                client.conn.close()
            except OSError:
                pass


def _remove(job: dict[str, Any]) -> bool:
    """Delete a job's weight file if its client gave it to us to lose (never a best model)."""
    path = Path(str(job.get("path", "")))
    if not job.get("delete") or path.suffix != ".safetensors":
        return False
    try:
        path.unlink()
        return True
    except OSError:
        return False


def build(cfg: dict[str, Any]) -> EvaluatorServer:
    """The server for a parsed train/tune config (bad input: UserError, before anything loads)."""
    from lit_sft.evaluator.config import EvaluatorConfig, place
    from lit_sft.evaluator.keys import load_key
    from lit_sft.evaluator.remote import client_sets, model_identity
    from lit_sft.weights import resolve_model_path

    evaluator = cfg["evaluator"]
    if not evaluator.get("address"):
        raise UserError("evaluator.address: the server needs HOST:PORT to listen on (e.g. --evaluator.address 127.0.0.1:5711)")
    config = EvaluatorConfig(**evaluator)
    key = load_key(config.key_file)
    placement = place(cfg)
    model_path = resolve_model_path(cfg["model"]["model_name_or_path"])
    sets = client_sets(cfg, test=True)
    spec = worker.WorkerSpec(
        model_path=model_path,
        backend=placement.backend,
        device=placement.device,
        problems=sets["validation"],
        max_new_tokens=config.max_new_tokens,
        batch_size=config.batch_size,
        num_examples=config.num_examples,
        grading_timeout_s=config.grading_timeout_s,
        gpu_memory_utilization=config.gpu_memory_utilization,
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        parent_pid=os.getppid(),
        torch_threads=_cpu_threads() if placement.device == "cpu" else None,
    )
    return EvaluatorServer(spec, sets, model_identity(model_path), str(config.address), key)


def _cpu_threads() -> int:
    """torch's own count (OMP_NUM_THREADS, else the cores): the server has the process to itself."""
    import torch

    return torch.get_num_threads()


def serve(cfg: dict[str, Any]) -> None:
    """Build, bind and run the server until SIGTERM or Ctrl-C."""
    import signal

    server = build(cfg)
    server.bind()
    spec = server.spec
    sets = ", ".join(f"{len(v)} {k}" for k, v in server.sets.items())
    server._log(f"listening on {server.address} (pid {os.getpid()}; {spec.backend} on {spec.device}; model {server.model}; {sets} problems)")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        server.run(stop)
    except KeyboardInterrupt:
        pass
    except Exception as err:  # noqa: BLE001 - the engine could not be built: say why, in one line
        print(f"error: evaluator engine failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        server.close()
        server._log("stopped")
    # Tearing down torch and the engine at interpreter exit takes seconds and does nothing useful.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
