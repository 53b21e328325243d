"""The shared evaluator server: real server processes on the tiny model, real clients, real files.

The server is `python -m lit_sft.evaluator serve` as a user starts it; clients are the
RemoteEvaluatorClient that train.py and tune.py use, in this process or in processes of their
own, and whole `tune.py` workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from lit_sft.errors import UserError
from lit_sft.evaluator import EvaluatorWarning
from lit_sft.evaluator.keys import KEY_ENV, address_problem, load_key, parse_address
from lit_sft.evaluator.remote import RemoteEvaluatorClient, ServerRefused, check_server, connect, request

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789abcdef"
DATA_ARGS = ["--data.num_generated", "160", "--data.eval_size", "16", "--data.num_validation_problems", "8", "--data.max_length", "128"]
EVAL_ARGS = ["--evaluator.max_new_tokens", "16", "--evaluator.batch_size", "8"]
READY_TIMEOUT_S = 180.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, KEY_ENV: KEY, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


class Server:
    """A `python -m lit_sft.evaluator serve` process and its log."""

    def __init__(self, model_path: str, address: str, log: Path, *extra: str) -> None:
        self.address, self.log = address, log
        argv = [sys.executable, "-m", "lit_sft.evaluator", "serve", "--model.model_name_or_path", model_path,
                *DATA_ARGS, *EVAL_ARGS, "--evaluator.address", address, *extra]
        with open(log, "a") as out:
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, needle: str, timeout_s: float = READY_TIMEOUT_S, count: int = 1) -> None:
        deadline = time.monotonic() + timeout_s
        while self.text().count(needle) < count:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {needle!r} within {timeout_s} s:\n{self.text()}"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def status(address: str) -> dict:
    conn = connect(address, KEY.encode())
    try:
        return request(conn, {"kind": "status"}, address)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def cfg(tiny_model_path: str) -> dict:
    """The parsed config of a tune.py worker on the server's model and data."""
    from lit_sft.config import parse

    return parse(["--model.model_name_or_path", tiny_model_path, *DATA_ARGS, *EVAL_ARGS], tune=True)


@pytest.fixture(scope="module")
def weights(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real checkpoint of the tiny model (copies of it are posted)."""
    from transformers import AutoModelForCausalLM

    from lit_sft.weights import save_weights

    return save_weights(AutoModelForCausalLM.from_pretrained(tiny_model_path), tmp_path_factory.mktemp("w") / "base.safetensors")


@pytest.fixture(scope="module")
def server(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    os.environ[KEY_ENV] = KEY  # this process's clients read it as train.py would
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = Server(tiny_model_path, f"127.0.0.1:{free_port()}", log)
    try:
        srv.wait_for("engine ready")
        yield srv
    finally:
        srv.stop()
        os.environ.pop(KEY_ENV, None)


def client(cfg: dict, address: str, name: str, test: bool = False) -> RemoteEvaluatorClient:
    from lit_sft.data import SFTDataModule
    from lit_sft.evaluator.launch import start_remote

    data = SFTDataModule(**cfg["data"])
    return start_remote({**cfg, "evaluator": {**cfg["evaluator"], "address": address}},
                        data.test_problems if test else data.validation_problems, test=test, name=name)


def copies(weights: Path, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(weights, folder / f"ckpt-{i}.safetensors")) for i in range(n)]


# ---- address and key ---------------------------------------------------------------------------


def test_addresses_and_keys_are_checked_before_anything_connects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_address("127.0.0.1:5711") == ("127.0.0.1", 5711)
    assert parse_address(":5711") == ("127.0.0.1", 5711), "no host: loopback"
    assert parse_address("[::1]:5711") == ("::1", 5711)
    assert address_problem("host") and address_problem("host:0") and address_problem("host:70000")
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(UserError, match="needs a key: set LIT_SFT_EVALUATOR_KEY or evaluator.key_file"):
        load_key(None)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    with pytest.raises(UserError, match=r"can be read by others \(mode 644\); chmod 600"):
        load_key(str(key_file))
    key_file.chmod(0o600)
    assert load_key(str(key_file)) == KEY.encode()
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(UserError, match=f"{KEY_ENV}: the key is shorter than 16 bytes"):
        load_key(str(key_file))
    from lit_sft.evaluator import EvaluatorConfig

    with pytest.raises(UserError, match="evaluator.address: 'nohost' is not HOST:PORT"):
        EvaluatorConfig(address="nohost")


@pytest.mark.skipif(__import__("lit_sft.available", fromlist=["x"]).vllm_build() is not None, reason="vLLM installed: it would serve")
def test_the_server_resolves_device_and_backend_as_a_run_does_and_stops_before_loading(tiny_model_path: str, tmp_path: Path) -> None:
    """The server's placement is `config.place`, the child evaluator's: the same refusal, exit 2."""
    from lit_sft.evaluator.config import place

    argv = [sys.executable, "-m", "lit_sft.evaluator", "serve", "--model.model_name_or_path", tiny_model_path, *DATA_ARGS,
            "--evaluator.backend", "vllm", "--evaluator.address", f"127.0.0.1:{free_port()}"]
    proc = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    with pytest.raises(UserError) as expected:
        place({"evaluator": {"device": "auto", "backend": "vllm"}, "trainer": {"accelerator": "cpu", "devices": 1}})
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {expected.value}", proc.stderr[-2000:]
    assert "listening" not in proc.stdout


# ---- one server, clients in this process -------------------------------------------------------


def test_status_answers_and_a_wrong_key_is_refused(server: Server) -> None:
    ok = subprocess.run([sys.executable, "-m", "lit_sft.evaluator", "status", "--evaluator.address", server.address],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert f"server: {server.address} pid {server.proc.pid}, transformers on cpu, engine ready" in ok.stdout
    assert "jobs served:" in ok.stdout and "clients:" in ok.stdout
    wrong = subprocess.run([sys.executable, "-m", "lit_sft.evaluator", "status", "--evaluator.address", server.address],
                           cwd=ROOT, env=env(**{KEY_ENV: "not-the-key-0123456789"}), capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().startswith("error: evaluator.address:") and "refused the key" in wrong.stderr
    assert "not-the-key" not in wrong.stderr + wrong.stdout
    server.wait_for("refused a connection: wrong key")
    assert KEY not in server.text() and "not-the-key" not in server.text()
    with pytest.raises(ServerRefused, match="refused the key"):
        connect(server.address, b"another-wrong-key-000")
    nobody = subprocess.run([sys.executable, "-m", "lit_sft.evaluator", "status", "--evaluator.address", f"127.0.0.1:{free_port()}"],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 1 and "no evaluator server answers" in nobody.stderr


def test_a_client_with_other_problems_or_model_is_refused(server: Server, cfg: dict, tmp_path: Path) -> None:
    mine = {**cfg, "evaluator": {**cfg["evaluator"], "address": server.address, "connect_timeout_s": 5.0}}
    check_server(mine, test=True)  # the same model and problems: accepted, both sets
    fewer = {**mine, "evaluator": {**mine["evaluator"], "num_problems": 4}}
    with pytest.raises(UserError, match=r"refused this run: its validation problems differ \(4 problems here, 8 on the server"):
        check_server(fewer)
    from lit_sft.tiny import build_tiny_model

    other = tmp_path / "other-model"
    build_tiny_model(other, num_hidden_layers=1, hidden_size=64)
    with pytest.raises(UserError, match="refused this run: its model is .*other-model, the server's is"):
        check_server({**mine, "model": {**mine["model"], "model_name_or_path": str(other)}})
    longer = {**mine, "evaluator": {**mine["evaluator"], "max_new_tokens": 64}}
    with pytest.raises(UserError, match="max_new_tokens is 64, the server's 16"):
        check_server(longer)


def test_jobs_are_graded_on_the_set_they_name_round_robin_and_cancels_touch_only_their_client(
    server: Server, cfg: dict, weights: Path, tmp_path: Path
) -> None:
    busy = client(cfg, server.address, "busy")
    other = client(cfg, server.address, "other")
    tester = client(cfg, server.address, "tester", test=True)
    try:
        busy_jobs = [busy.post("busy", i, i, str(p)) for i, p in enumerate(copies(weights, tmp_path / "busy", 8))]
        other_job = other.post("other", 0, 0, str(copies(weights, tmp_path / "other", 1)[0]))
        # Every posted job is queued, running or served (once all have crossed the socket): the
        # queue depth per client is real.
        deadline = time.monotonic() + 10
        while True:
            mid = status(server.address)
            busy_row = next(c for c in mid["clients"] if c["name"] == "busy")
            running = mid["running"] is not None and mid["running"]["client"] == "busy"
            if busy_row["queued"] + busy_row["served"] + running == 8 or time.monotonic() > deadline:
                break
        assert busy_row["queued"] + busy_row["served"] + running == 8, mid
        (first,) = other.wait(60, jobs=[other_job])
        busy_done = 8 - len(busy.outstanding) - len(busy.poll())
        # Round robin: the other client's one job came after at most the job running when it
        # arrived and the next in turn, not after busy's whole backlog.
        assert first["status"] == "ok" and first["num_problems"] == 8, first
        assert len(busy.outstanding) >= 5, f"other's job waited for {busy_done} of busy's jobs"
        # busy gives up on its jobs: other's are untouched, and the server skips busy's queue.
        other_jobs = [other.post("other", i, i, str(p)) for i, p in enumerate(copies(weights, tmp_path / "other2", 2), 1)]
        busy.cancel(busy_jobs)
        assert busy.outstanding == []
        results = other.wait(60, jobs=other_jobs)
        assert [r["status"] for r in results] == ["ok", "ok"]
        # The final test's client is graded on the test problems.
        (graded,) = tester.wait(60, jobs=[tester.post("final-test", 0, 0, str(weights))])
        assert graded["status"] == "ok" and graded["num_problems"] == server_sets(server)["test"] > 8
        assert weights.exists(), "the final test's file is not the server's to delete"
        late = busy.wait(3)
        assert late == [], "a cancelled job's result must not come back"
        after = {c["name"]: c for c in status(server.address)["clients"]}
        assert after["busy"]["queued"] == 0 and after["busy"]["served"] < 8
        assert after["other"]["served"] == 3 and after["other"]["mean_wait_s"] is not None
    finally:
        for c in (busy, other, tester):
            c.stop()


def server_sets(server: Server) -> dict:
    return status(server.address)["sets"]


def test_a_killed_client_has_its_queue_dropped_and_its_weight_files_removed(
    server: Server, cfg: dict, weights: Path, tmp_path: Path
) -> None:
    from lit_sft.data import SFTDataModule

    files = copies(weights, tmp_path / "doomed", 6)
    problems = [[p.prompt, p.answer] for p in SFTDataModule(**cfg["data"]).validation_problems][:8]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"address": server.address, "model": cfg["model"]["model_name_or_path"], "problems": problems,
                                "files": [str(f) for f in files]}))
    script = textwrap.dedent(f"""
        import json, os, signal
        from lit_sft.evaluator.keys import load_key
        from lit_sft.evaluator.remote import RemoteEvaluatorClient
        s = json.load(open({str(spec)!r}))
        c = RemoteEvaluatorClient(s["address"], load_key(None), s["model"], [tuple(p) for p in s["problems"]],
                                  max_new_tokens=16, name="doomed")
        c.start()
        for i, f in enumerate(s["files"]):
            c.post("doomed", i, i, f)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    server.wait_for("client doomed disconnected without a goodbye", timeout_s=30)
    deadline = time.monotonic() + 30
    while any(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(f.exists() for f in files), [f.name for f in files if f.exists()]
    assert "doomed" not in {c["name"] for c in status(server.address)["clients"]}


@pytest.mark.slow
def test_train_py_posts_to_the_server_starts_no_evaluator_and_writes_no_key(server: Server, tiny_model_path: str, tmp_path: Path) -> None:
    argv = [sys.executable, str(ROOT / "train.py"), "fit", "--model.model_name_or_path", tiny_model_path, *DATA_ARGS, *EVAL_ARGS,
            "--output_dir", str(tmp_path / "out"), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false", "--budget.examples", "null", "--budget.eval_every_examples", "null",
            "--evaluator.address", server.address, "--wandb.save_dir", str(tmp_path / "wandb")]
    with Watcher() as watcher, open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
        watcher.pids = [proc.pid]
        proc.wait(300)
    out = (tmp_path / "train.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"eval/accuracy: \d", out), out[-2000:]
    assert f":{proc.pid} connected (validation problems)" in server.text()
    assert watcher.evaluators == set(), watcher.evaluators
    assert list((tmp_path / "wandb").rglob("offline-run-*")), "the run was logged to W&B (offline)"
    leaked = [str(f) for f in tmp_path.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    assert leaked == [], leaked


def test_tune_py_with_a_wrong_key_stops_before_any_trial_exists(server: Server, tiny_model_path: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    argv = shared_tune_argv(tiny_model_path, results, server.address, n_trials=2, max_steps=4)
    proc = subprocess.run(argv, cwd=ROOT, env=env(**{KEY_ENV: "the-wrong-key-0123456789"}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: evaluator.address: the evaluator server at") and "refused the key" in lines[-1]
    assert "Traceback" not in proc.stderr and "the-wrong-key" not in proc.stdout + proc.stderr
    assert not (results / "optuna.db").exists(), "no study, so no trial, may exist"


# ---- the server dies ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_server_costs_missing_results_and_a_restarted_one_serves_the_next_post(
    tiny_model_path: str, cfg: dict, weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    address = f"127.0.0.1:{free_port()}"
    first = Server(tiny_model_path, address, tmp_path / "server.log")
    try:
        first.wait_for("engine ready")
        c = client(cfg, address, "trainer")
        paths = copies(weights, tmp_path / "ckpt", 6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jobs = [c.post("run", i, i, str(p)) for i, p in enumerate(paths[:4])]
            first.proc.kill()
            first.proc.wait()
            results = c.wait(30, jobs=jobs)
            down = c.post("run", 4, 4, str(paths[4]))  # nobody listens: missing at once, no new warning
            results += c.poll()
        by_job = {r["job"]: r for r in results}
        assert set(by_job) == {*jobs, down}, "every job is answered: ok before the kill, missing after"
        assert by_job[down]["status"] == "missing" and "no evaluator server answers" in by_job[down]["error"]
        assert any(r["status"] == "missing" for r in results)
        gone = [w for w in caught if issubclass(w.category, EvaluatorWarning)]
        assert len(gone) == 1 and "went away" in str(gone[0].message) and "training goes on" in str(gone[0].message)
        second = Server(tiny_model_path, address, tmp_path / "server.log")  # the same port, at once
        try:
            second.wait_for("listening on", count=2)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                job = c.post("run", 5, 5, str(paths[5]))
                (result,) = c.wait(READY_TIMEOUT_S, jobs=[job])
            assert result["status"] == "ok", result
            assert any("answers again" in str(w.message) for w in caught)
            assert c.pid == second.proc.pid
        finally:
            c.stop()
            second.stop()
    finally:
        first.stop()


# ---- two tune.py workers and one server ---------------------------------------------------------


def descendants(pid: int) -> list[str]:
    """Command lines of every live descendant of `pid` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        for child in frontier:
            try:
                found.append(Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                pass
    return found


class Watcher:
    """Samples the process trees of some processes while they run: which ones are evaluators."""

    def __init__(self) -> None:
        import threading

        self.pids: list[int] = []
        self.evaluators: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for pid in list(self.pids):
                # A spawned multiprocessing child is what EvaluatorClient starts.
                self.evaluators |= {c for c in descendants(pid) if "spawn_main" in c}
            self.samples += 1


def shared_tune_argv(tiny_model_path: str, results: Path, address: str, n_trials: int, max_steps: int, interval: int = 2) -> list[str]:
    from tests.test_workers import tune_argv

    return tune_argv(tiny_model_path, results, "shared", "--study.n_trials", str(n_trials), "--study.save_best_model", "true",
                     "--evaluator.enabled", "true", "--evaluator.address", address, *EVAL_ARGS, max_steps=max_steps, interval=interval)


def graded(trial) -> bool:
    return "accuracy" in trial.user_attrs and "evaluations_missing" not in trial.user_attrs


@pytest.mark.slow
def test_two_tune_workers_share_one_server_and_start_no_evaluator_of_their_own(tiny_model_path: str, tmp_path: Path) -> None:
    import optuna

    from tests.helpers import sqlite_url
    from tests.test_workers import finish_workers, start_workers

    address = f"127.0.0.1:{free_port()}"
    srv = Server(tiny_model_path, address, tmp_path / "server.log")
    results = tmp_path / "results"
    try:
        srv.wait_for("engine ready")
        argv = shared_tune_argv(tiny_model_path, results, address, n_trials=4, max_steps=6)
        with Watcher() as watcher:
            procs = start_workers([argv, argv], tmp_path, env=env())
            watcher.pids = [p.pid for p in procs] + [srv.proc.pid]
            outputs = finish_workers(procs, tmp_path, timeout_s=600)
        served = status(address)
    finally:
        srv.stop()
    assert watcher.samples > 5 and watcher.evaluators == set(), watcher.evaluators
    study = optuna.load_study(study_name="shared", storage=sqlite_url(results))
    trials = study.trials
    assert len(trials) == 4 and all(graded(t) for t in trials), [t.user_attrs for t in trials]
    # Both workers were the server's clients; it graded every evaluation and the final test.
    for proc in procs:
        assert f":{proc.pid} connected (validation problems)" in srv.text()
    histories = [json.loads(p.read_text()) for p in results.glob("trials/shared/trial-*/history.json")]
    evaluations = sum(len(h["evaluations"]) for h in histories)
    assert len(histories) == 4 and all(e["status"] == "ok" for h in histories for e in h["evaluations"])
    final = study.user_attrs["final_test"]
    assert "error" not in final and final["n"] == served["sets"]["test"], final
    # Each worker grades the best model at its end unless the other has stored it already.
    final_tests = srv.text().count("connected (test problems)")
    assert 1 <= final_tests <= 2 and served["served"] == evaluations + final_tests and evaluations >= 4, (served, outputs)


@pytest.mark.slow
def test_a_server_killed_mid_study_and_restarted_grades_the_trials_after_it(tiny_model_path: str, tmp_path: Path) -> None:
    import optuna

    from tests.helpers import sqlite_url
    from tests.test_workers import finish_workers, start_workers

    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "server.log"
    first = Server(tiny_model_path, address, log)
    results = tmp_path / "results"
    second = None
    try:
        first.wait_for("engine ready")
        # Trials long enough that some start after the new server (seconds to import) listens.
        argv = shared_tune_argv(tiny_model_path, results, address, n_trials=12, max_steps=60, interval=10)
        procs = start_workers([argv, argv], tmp_path, env=env())
        deadline = time.monotonic() + 300
        while status(address)["served"] < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), first.text()
            time.sleep(0.3)
        first.proc.kill()  # SIGKILL mid-study
        first.proc.wait()
        second = Server(tiny_model_path, address, log)  # the same port, at once
        second.wait_for("engine ready", count=2)  # under two trainers' load it takes tens of seconds
        restarted = time.time()
        outputs = finish_workers(procs, tmp_path, timeout_s=600)
    finally:
        for srv in (first, second):
            if srv is not None:
                srv.stop()
    study = optuna.load_study(study_name="shared", storage=sqlite_url(results))
    trials = study.trials
    assert len(trials) == 12 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    later = [t for t in trials if t.datetime_start.timestamp() > restarted]
    assert later and all(graded(t) for t in later), [(t.number, t.user_attrs) for t in later]
    # Each worker warned once at most about the outage, and kept training.
    assert all(out.count("went away") <= 1 for out in outputs) and any("went away" in out for out in outputs), outputs
    assert "error" not in study.user_attrs["final_test"]
