"""What a study leaves behind: study_results.yaml, REPORT.md, a trials table, and plots.

`write_report` reads the summary (lit_sft.study.results) from the storage and hands it to the
writers (markdown.py, plots.py); they take their shared helpers from results.py, never from
here, so the imports run one way: report -> markdown, plots -> results.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna

from lit_sft.failures import failure_text
from lit_sft.study.markdown import write_markdown
from lit_sft.study.results import (  # noqa: F401 - re-exported: the study's files by their old names
    BEST_MODEL_DIR,
    BEST_MODEL_MARKER,
    CATEGORIES,
    REPORT_FILE,
    RESULTS_FILE,
    accuracy_figures,
    baseline_line,
    budget_line,
    format_accuracy,
    format_value,
    load_histories,
    load_history,
    objective_of,
    save_history,
    study_rungs,
    summarize,
    trial_dir,
    trial_note,
    write_json,
    write_results,
)


def format_table(summary: dict[str, Any]) -> str:
    """The trials as an aligned text table, best trial marked with *."""
    rows = summary["trials"]
    names = list(dict.fromkeys(name for r in rows for name in r["params"]))
    header = ["trial", "state", *names, summary["metric"], "accuracy [95%]", "examples", "note"]
    lines = []
    for r in rows:
        value = objective_of(r)
        cells = [
            f"{r['number']}{'*' if r['number'] == summary['best_trial'] else ''}",
            r["state"].lower(),
            *(format_value(r["params"].get(n)) for n in names),
            format_value(value) + ("" if r["value"] is not None or value is None else " (best)"),
            format_accuracy(r["accuracy"], r["accuracy_ci"]),
            format_value(r["examples_seen"]),
            trial_note(r),
        ]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_report(study: optuna.Study, *, metric: str, n_trials: int | None, results_dir: str | Path, plots: bool = True,
                 print_fn=print, total_examples: int | None = None) -> dict[str, Any]:
    """study_results.yaml, REPORT.md (and plots) from the storage; prints the trials table. Returns the summary."""
    summary = summarize(study, metric=metric, n_trials=n_trials, results_dir=results_dir, total_examples=total_examples)
    histories = load_histories(results_dir, summary)
    if plots and summary["trials"]:
        from lit_sft.study.plots import make_plots

        summary["plots"], summary["plots_skipped"] = make_plots(study, summary, results_dir, histories)
    summary["report_file"] = str(write_markdown(summary, histories, results_dir))
    summary["results_file"] = str(write_results(summary, results_dir))
    print_fn(format_table(summary))
    for line in _closing_lines(summary):
        print_fn(line)
    return summary


def _closing_lines(summary: dict[str, Any]) -> Iterable[str]:
    counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items())
    yield f"study {summary['study']}: {counts or 'no trials'}; {budget_line(summary['budget'])}"
    if summary["best_trial"] is not None:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in summary["best_params"].items())
        acc = summary["best_accuracy"]
        shown = f", accuracy {format_accuracy(acc, summary['best_accuracy_ci'], summary['best_accuracy_n'])}" if acc is not None else ""
        yield f"best: trial {summary['best_trial']} {summary['metric']}={format_value(summary['best_value'])}{shown} ({params})"
        if summary["best_accuracy_ci"] is not None:
            tied = summary["tied_with_best"]
            yield f"tied with the best at 95%: {'trials ' + ', '.join(map(str, tied)) if tied else 'none'}"
    else:
        yield "best: none (no trial completed)"
    if summary.get("baseline"):
        yield f"baseline: {baseline_line(summary['baseline'], summary['metric'])}"
    test = summary.get("test_accuracy")
    if test is not None:
        yield f"final test: {format_test(test)}"
    elif summary.get("test_skipped"):
        yield f"final test: none: {summary['test_skipped']}"
    for failure in summary["failures"]:
        yield f"failed: trial {failure['number']}" + failure_text(failure["reason"], failure["error"], " ({reason}): {error}", ": {error}")
    if summary["best_model"]:
        yield f"best model: {summary['best_model']}"
    yield f"results: {summary['results_file']}"
    yield f"report: {summary['report_file']}"
    if summary.get("plots"):
        yield f"plots: {Path(next(iter(summary['plots'].values()))).parent}"


def format_test(test: dict[str, Any]) -> str:
    """One line for the final test result; a stale one says whose it is."""
    if test.get("error"):
        return f"trial {test['trial']} failed: {test['error']}"
    source = f", {test['source']}" if test.get("source") else ""
    text = f"trial {test['trial']} accuracy {format_accuracy(test['accuracy'], test['ci'])} (n={test['n']}{source})"
    return text + (f" [stale: {test['note']}]" if test["stale"] else "")
