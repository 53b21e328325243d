"""The shared evaluator's address and key: parsed and checked before anything connects or loads.

The key is a shared secret for `multiprocessing.connection`'s HMAC challenge-response: neither
side ever sends it. It comes from the environment (`LIT_SFT_EVALUATOR_KEY`) or from a file only
its owner can read, never from the command line (which `ps` shows to every user), and it is
registered with `lit_sft.secrets` so no line the project writes can carry it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lit_sft import secrets
from lit_sft.errors import UserError

KEY_ENV = "LIT_SFT_EVALUATOR_KEY"
LOOPBACK = "127.0.0.1"
_MIN_KEY_BYTES = 16


def address_problem(text: str) -> str | None:
    """Why `text` is not HOST:PORT (or :PORT / PORT, meaning loopback); None when it is."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"{text!r} is not HOST:PORT with a port from 1 to 65535"
    if host.startswith("[") != host.endswith("]"):
        return f"{text!r}: an IPv6 host goes in brackets, [::1]:PORT"
    return None


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT; a missing host is loopback. UserError naming the key if bad."""
    problem = address_problem(str(text))
    if problem:
        raise UserError(f"evaluator.address: {problem}")
    host, _, port = str(text).rpartition(":")
    return (host.strip("[]") or LOOPBACK, int(port))


def load_key(key_file: str | None) -> bytes:
    """The shared key: LIT_SFT_EVALUATOR_KEY, else `key_file` (owner-only), else UserError."""
    value = os.environ.get(KEY_ENV)
    if value:
        source = KEY_ENV
    elif key_file:
        value = _read_key_file(Path(key_file))
        source = f"evaluator.key_file {key_file}"
    else:
        raise UserError(
            f"evaluator.address: a shared evaluator needs a key: set {KEY_ENV} or evaluator.key_file "
            "(a file only you can read: umask 077; head -c 32 /dev/urandom | base64 > FILE)"
        )
    value = value.strip()
    if len(value.encode()) < _MIN_KEY_BYTES:
        raise UserError(f"{source}: the key is shorter than {_MIN_KEY_BYTES} bytes; use e.g. 32 random bytes in base64")
    secrets.register(value)
    return value.encode()


def _read_key_file(path: Path) -> str:
    try:
        info = path.stat()
        text = path.read_text()
    except OSError as err:
        raise UserError(f"evaluator.key_file: cannot read {path}: {err.strerror or err}") from err
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(
            f"evaluator.key_file: {path} can be read by others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"chmod 600 {path}"
        )
    if info.st_uid != os.getuid():
        raise UserError(f"evaluator.key_file: {path} belongs to another user")
    return text
