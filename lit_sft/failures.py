"""How a failed run or trial is described: a Ctrl-C as what it was, anything else in one line."""

from __future__ import annotations

CTRL_C = "interrupted (Ctrl-C)"


def is_ctrl_c(err: BaseException) -> bool:
    """A Ctrl-C, also after Lightning turned it into `sys.exit(1)` following its own shutdown
    (the SystemExit is raised while handling the KeyboardInterrupt, so that is its context)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def describe(err: BaseException) -> str:
    """`interrupted (Ctrl-C)`, or `Type: message` on one line (500 characters at most)."""
    if is_ctrl_c(err):
        return CTRL_C
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:500] if text else type(err).__name__


def failure_text(reason: str, error: str, form: str = "{reason}: {error}", alone: str = "{error}") -> str:
    """`error` under its `reason` in `form`, or in `alone` where the error already says the
    reason (`interrupted (Ctrl-C)`), so it is not said twice."""
    return (alone if error.startswith(reason) else form).format(reason=reason, error=error)
