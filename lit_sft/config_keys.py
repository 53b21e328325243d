"""Unknown keys in a config file or on the command line, with the file, the line and the closest key.

jsonargparse reports `Group 'model' does not accept option 'learning_rat'`: no file (several may
be given), no line, and no hint of the key that was meant.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from lit_sft.errors import UserError


def parser_keys(parser: Any) -> tuple[set[str], set[str]]:
    """(every dotted key, the section keys among them: those with keys below them)."""
    keys = {a.dest for a in parser._actions if a.dest and not a.dest.endswith(".help")} - {"help", "config", "print_config"}
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    return keys, sections


def suggestion(key: str, keys: set[str]) -> str:
    """`; did you mean model.learning_rate?` (the closest key, its own section's first), or ''."""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted(k for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == section)
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6) or difflib.get_close_matches(key, sorted(keys), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def file_problems(path: str | Path, keys: set[str], sections: set[str]) -> list[str]:
    """`configs/x.yaml, line 3: model.learning_rat is not a config key; did you mean model.learning_rate?`"""
    import yaml

    root = yaml.compose(Path(path).read_text(), Loader=yaml.SafeLoader)
    problems: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            if key in sections:
                walk(value_node, f"{key}.")
            elif key not in keys:
                problems.append(f"{path}, line {key_node.start_mark.line + 1}: {key} is not a config key{suggestion(key, keys)}")

    walk(root, "")
    return problems


def argv_problems(argv: list[str], keys: set[str], sections: set[str]) -> list[str]:
    """`--model.learning_rat is not a config key; did you mean --model.learning_rate?`

    Only dotted options: the rest (--config, --print_config, --help) are jsonargparse's to judge.
    An option below a key that takes a class (`--trainer.strategy.init_args...`) is left to it too.
    """
    problems = []
    for arg in argv:
        if not arg.startswith("--") or "." not in arg:
            continue
        key = arg[2:].split("=", 1)[0].rstrip("+")
        if key in keys or any(key.startswith(f"{k}.") for k in keys - sections):
            continue
        hint = suggestion(key, keys).replace("mean ", "mean --")
        problems.append(f"--{key} is not a config key{hint}")
    return problems


def check_keys(parser: Any, paths: list[str], argv: list[str]) -> None:
    """Every unknown key of the config files and the command line, in one UserError."""
    keys, sections = parser_keys(parser)
    problems = [p for path in paths for p in file_problems(path, keys, sections)] + argv_problems(argv, keys, sections)
    if problems:
        raise UserError("; ".join(problems))
