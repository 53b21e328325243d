"""A real PostgreSQL server for the tests: initdb and pg_ctl in a temporary folder, on loopback.

PostgreSQL refuses to run as root, and CI runs as root: there the server runs as an
unprivileged user (`nobody`, or one created with useradd) through `runuser`. The server listens
on 127.0.0.1 at a free port, with its unix socket inside its folder, and trusts every local
connection (a test server: nothing else can reach it). Tests that use it skip only where no
initdb exists at all; .ci/run installs the server packages.

Use: `from tests.postgres import postgres_server  # noqa: F401` in a test module, then take the
`postgres_server` fixture; `server.create_database(name)` returns a URL for a fresh database.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "lit"
"""The database superuser initdb creates (not an OS user)."""
FALLBACK_OS_USER = "lit-sft-pg"


def find_bin_dir() -> Path | None:
    """The folder of initdb/pg_ctl: PATH first, then the Debian layout (newest version)."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def _os_user() -> str | None:
    """The unprivileged OS user to run the server as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in ("nobody", FALLBACK_OS_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", FALLBACK_OS_USER], check=True)
    return FALLBACK_OS_USER


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    """Data, socket and log live here; removed on stop."""
    port: int
    os_user: str | None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def _cmd(self, *args: str) -> list[str]:
        if self.os_user is None:
            return list(args)
        return ["runuser", "-u", self.os_user, "--", *args]

    def _run(self, *args: str) -> None:
        result = subprocess.run(self._cmd(*args), capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}{log}")

    def start(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            if (self.data_dir / "postmaster.pid").exists():  # not already stopped from outside
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        """A connection URL; the server trusts loopback, so a password is accepted and unused."""
        auth = f"{SUPERUSER}:{password}" if password else SUPERUSER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str, password: str | None = None) -> str:
        import psycopg2

        connection = psycopg2.connect(self.url())
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name, password)


def start_server() -> PostgresServer:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("initdb")
    os_user = _os_user()
    # Under /tmp, not pytest's tmp_path: the server's user must be able to reach its folder,
    # and pytest's folders are private to root.
    root = Path(tempfile.mkdtemp(prefix="lit-sft-pg-"))
    if os_user is not None:
        entry = pwd.getpwnam(os_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bin_dir=bin_dir, root=root, port=_free_port(), os_user=os_user)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session, stopped at its end."""
    if find_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine; .ci/run installs them")
    server = start_server()
    try:
        yield server
    finally:
        server.stop()
