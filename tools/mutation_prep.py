"""Make decorated functions visible to mutmut, in a scratch copy of the repo (never in place).

mutmut 3 skips every decorated function (it cannot trampoline through a decorator), which
would leave `@override` hooks and `@property` getters such as `SFTDataModule.micro_batch_size`
untested. Applying the decorator after the definition (`name = property(name)`) means the same
at run time and lets mutmut mutate the body.

    python tools/mutation_prep.py SCRATCH_DIR lit_sft/data.py callbacks/pruning.py ...
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# mutmut trampolines these itself; a dataclass decorates a class, not a function.
KEPT = {"staticmethod", "classmethod"}
# Dropped (the functions cached are pure): a cache filled by the unmutated code before a mutant's
# tests run (mutmut's clean run) answers them with the original results.
DROPPED = {"cache", "functools.cache"}


def _movable(node: ast.FunctionDef) -> bool:
    names = [ast.unparse(d) for d in node.decorator_list]
    return bool(names) and not set(names) & KEPT and all(n.replace(".", "").isidentifier() for n in names)


def undecorate(source: str) -> str:
    """Each `@deco def f` becomes `def f` followed by `f = deco(f)`, innermost decorator first."""
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []  # (start, end) line slices to replace, 0-based
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not _movable(node):
            continue
        first = node.decorator_list[0].lineno - 1
        indent = lines[node.lineno - 1][: node.col_offset]
        body = lines[node.lineno - 1 : node.end_lineno]
        after = [f"{indent}{node.name} = {ast.unparse(d)}({node.name})\n"
                 for d in reversed(node.decorator_list) if ast.unparse(d) not in DROPPED]
        edits.append((first, node.end_lineno, body + after))
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    return "".join(lines)


def main(root: str, *paths: str) -> None:
    for rel in paths:
        path = Path(root) / rel
        before = path.read_text()
        after = undecorate(before)
        ast.parse(after)  # a broken rewrite must stop here, not as a wall of "killed" mutants
        path.write_text(after)


if __name__ == "__main__":
    main(*sys.argv[1:])
