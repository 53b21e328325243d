"""Keep passwords and API keys out of everything lit-sft writes or prints.

Two secrets reach a tuning run: the password in a storage URL (`postgresql://user:pw@host/db`)
and a W&B key in the environment (`WANDB_API_KEY`). They are registered once, at the start of
`tune()`, and every line or file the tuner produces from text that might hold them (progress
lines, error messages, tracebacks) goes through `mask`. The command line itself is masked too:
W&B copies `sys.argv` into each run's metadata, so a password passed as `--study.storage` would
otherwise be uploaded with every trial.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
SECRET_ENV = ("WANDB_API_KEY", "LIT_SFT_EVALUATOR_KEY")
"""Environment variables whose values are secrets wherever they appear."""
_MIN_LENGTH = 4
"""Shorter values are not masked: replacing every "ab" in a log would garble it and hide nothing."""

_registered: set[str] = set()


def url_password(url: str) -> str | None:
    """The password in `scheme://user:password@host/...`, or None."""
    try:
        return urlsplit(url).password
    except ValueError:  # a malformed port, say: nothing we can parse, nothing to mask
        return None


def mask_url(url: str) -> str:
    """`postgresql://user:***@host/db` for `postgresql://user:pw@host/db`; other URLs unchanged."""
    password = url_password(url)
    if not password:
        return url
    parts = urlsplit(url)
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{hostinfo}"))


def register(*values: str | None) -> None:
    """Treat these strings as secrets from now on (None and very short values are ignored)."""
    for value in values:
        if value and len(value) >= _MIN_LENGTH:
            _registered.add(value)


def register_url(url: str | None) -> None:
    """Register the password of a storage URL (and its URL-encoded form, as written)."""
    if not url:
        return
    register(url_password(url))
    try:
        raw = urlsplit(url).netloc.rpartition("@")[0].partition(":")[2]
    except ValueError:
        return
    register(raw)  # "p%40ss" as typed, besides the decoded "p@ss"


def register_environment() -> None:
    """Register the values of the secret environment variables that are set."""
    register(*(os.environ.get(name) for name in SECRET_ENV))


def mask(text: str) -> str:
    """`text` with every registered secret replaced by ***."""
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted(_registered, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def scrub_argv() -> None:
    """Mask the secrets in this process's `sys.argv` (read later by W&B for its run metadata)."""
    sys.argv[:] = [mask(arg) for arg in sys.argv]
