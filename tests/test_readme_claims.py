"""The README's sentence on what the embedded task's learning rates reach is what docs/BENCHMARKS.md measured."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = "## Embedded task calibration"
AT_BUDGET = "## Embedded task at a trial's budget"
GOOD = (1e-3, 3e-3)
"""The learning rates the README's sentence speaks of."""


def _rows(heading: str) -> list[dict[str, str]]:
    """The first Markdown table after `heading` in docs/BENCHMARKS.md, as dicts by column."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    lines, started = [], False
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            started = True
            lines.append([c.strip() for c in line.strip("|").split("|")])
        elif started:
            break
    head, body = lines[0], lines[2:]
    return [dict(zip(head, cells)) for cells in body]


def _percent(cell: str) -> float:
    return float(cell.rstrip("%"))


def _span(values: list[float]) -> str:
    low, high = (f"{v:g}" for v in (min(values), max(values)))
    return f"{high}%" if low == high else f"{low}-{high}%"


def _bullet() -> str:
    text = " ".join((ROOT / "README.md").read_text().split())
    start = text.index("**Why it makes tuning meaningful**")
    return text[start:text.index(" ## ", start)]


def _good(row: dict[str, str]) -> bool:
    return GOOD[0] <= float(row["lr"]) <= GOOD[1]


def test_the_embedded_task_sentence_says_what_was_measured():
    bullet = _bullet()
    # 1,585 steps of batch 32: the calibration table, and the same run length in the trial-budget one.
    full = [_percent(r["accuracy"]) for r in _rows(CALIBRATION) if _good(r)]
    full += [_percent(r["accuracy"]) for r in _rows(AT_BUDGET) if _good(r) and r["steps"] == "1,585" and r["batch"] == "32"]
    assert len(full) >= 3 and f"1e-3..3e-3 reaches {_span(full)} answer accuracy after 1,585 steps" in bullet
    # A trial's budget: the examples configs/tune.yaml gives each trial.
    examples = yaml.safe_load((ROOT / "configs" / "tune.yaml").read_text())["budget"]["examples"]
    assert f"each trial {examples:,} examples" in bullet
    at_budget = [_percent(r["accuracy"]) for r in _rows(AT_BUDGET) if _good(r) and r["examples"] == f"{examples:,}"]
    assert len(at_budget) >= 2 and f"at that budget 1e-3..3e-3 reaches {_span(at_budget)}" in bullet
    assert not re.search(r"99-100% answer accuracy in about a minute", bullet)
