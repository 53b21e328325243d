"""Reading a user's YAML file (a config, a search space) with errors that name the file and place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_sft.errors import UserError


def read_yaml(path: str | Path, what: str) -> tuple[str, Any]:
    """(text, data) of a YAML file; UserError naming `what` and the file, or the file, line and column."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{what}: no such file: {path}") from None
    except OSError as err:
        raise UserError(f"{what}: cannot read {path}: {err.strerror or err}") from None
    try:
        return text, yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: {yaml_problem(err)}") from None


def yaml_problem(err: Exception) -> str:
    """`line 3, column 18: ...`: where the broken construct starts, and where YAML noticed it.

    The parsers we hand files to report `"<unicode string>", line 1`, naming neither.
    """
    context, problem = getattr(err, "context_mark", None), getattr(err, "problem_mark", None)
    start = context or problem
    if start is None:
        return f"not valid YAML: {str(err).splitlines()[0]}"
    text = f"line {start.line + 1}, column {start.column + 1}: not valid YAML: "
    if context is not None and getattr(err, "context", None):
        text += f"{err.context}"
        if problem is not None and getattr(err, "problem", None):
            text += f", {err.problem} at line {problem.line + 1}, column {problem.column + 1}"
        return text
    return text + str(getattr(err, "problem", None) or str(err).splitlines()[0])
