"""What a study leaves behind: study_results.yaml, a trials table, and plots.

Everything is read back from the study's storage and the per-trial files under
`results_dir/trials/<study>/trial-NNNN/`, never from this process's memory, so the report of a
resumed study or of a study run by several workers covers every trial.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

CATEGORIES = ("correct", "wrong_answer", "format_failure")
RESULTS_FILE = "study_results.yaml"
BEST_MODEL_DIR = "best_model"
BEST_MODEL_MARKER = "lit_sft_trial.json"
"""Written beside the best model's weights: which study and trial they are, and its value."""


# ---- per-trial files ------------------------------------------------------------------------


def trial_dir(results_dir: str | Path, study_name: str, number: int) -> Path:
    """Everything one trial writes, keyed by study and trial so workers never collide."""
    return Path(results_dir) / "trials" / study_name / f"trial-{number:04d}"


def _write_atomic(path: Path, text: str) -> Path:
    """Write-then-rename: a reader (the report of another worker) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any) -> Path:
    return _write_atomic(path, json.dumps(data, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def save_history(results_dir: str | Path, study_name: str, number: int, history: list[dict], evaluations: list[dict]) -> Path:
    """Loss curves and evaluator results of one trial, for plots after any restart."""
    # Generated texts are large and already in W&B; the curves need only the figures.
    slim = [{k: v for k, v in e.items() if k != "examples"} for e in evaluations]
    path = trial_dir(results_dir, study_name, number) / "history.json"
    write_json(path, {"history": history, "evaluations": slim})
    return path


def load_history(results_dir: str | Path, study_name: str, number: int) -> dict[str, list[dict]]:
    path = trial_dir(results_dir, study_name, number) / "history.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"history": [], "evaluations": []}


# ---- summary --------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        "params": dict(trial.params),
        # Optuna stores a pruned trial's last report as its value; only a complete trial has an objective.
        "value": _finite(trial.value) if trial.state == TrialState.COMPLETE else None,
        "best_objective": _finite(attrs.get("best_objective")),
        "accuracy": _finite(attrs.get("accuracy")),
        "categories": attrs.get("categories"),
        "best_step": attrs.get("best_step"),
        "best_examples_seen": attrs.get("best_examples_seen"),
        "examples_seen": attrs.get("examples_seen"),
        "duration_s": round(trial.duration.total_seconds(), 1) if trial.duration else None,
    }
    if trial.state == TrialState.PRUNED:
        row["pruned_at"] = attrs.get("pruned_at")
    if trial.state == TrialState.FAIL:
        row["error"] = attrs.get("error", "no error recorded (the worker died or was interrupted)")
        row["reason"] = attrs.get("reason", "stale" if "error" not in attrs else "exception")
    return row


def summarize(study: optuna.Study, *, metric: str, n_trials: int, results_dir: str | Path) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    rows = [trial_row(t) for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    summary: dict[str, Any] = {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": metric,
        "n_trials": n_trials,
        "counts": {k: v for k, v in counts.items() if v},
        "best_trial": best.number if best else None,
        "best_value": _finite(best.value) if best else None,
        "best_params": dict(best.params) if best else None,
        "best_accuracy": _finite(best.user_attrs.get("accuracy")) if best else None,
        "best_categories": best.user_attrs.get("categories") if best else None,
        "best_model": None,
        "trials": rows,
        "failures": [{"number": r["number"], "reason": r["reason"], "error": r["error"]} for r in rows if r["state"] == "FAIL"],
    }
    marker = Path(results_dir) / BEST_MODEL_DIR / BEST_MODEL_MARKER
    if best is not None and marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("study") == study.study_name and saved.get("trial") == best.number:
            summary["best_model"] = str(marker.parent)
    return summary


def objective_of(row: dict[str, Any]) -> float | None:
    """A complete trial's value, else (pruned) the best value it reached before it stopped."""
    return row["value"] if row["value"] is not None else row["best_objective"]


def format_table(summary: dict[str, Any]) -> str:
    """The trials as an aligned text table, best trial marked with *."""
    rows = summary["trials"]
    names = list(dict.fromkeys(name for r in rows for name in r["params"]))
    header = ["trial", "state", *names, summary["metric"], "accuracy", "examples", "note"]
    lines = []
    for r in rows:
        note = ""
        if r["state"] == "PRUNED" and r.get("pruned_at") is not None:
            note = f"pruned at {r['pruned_at']} examples"
        elif r["state"] == "FAIL":
            note = f"{r['reason']}: {r['error']}"[:80]
        elif r["state"] == "COMPLETE" and r.get("best_examples_seen") is not None:
            note = f"best at {r['best_examples_seen']} examples"
        value = objective_of(r)
        cells = [
            f"{r['number']}{'*' if r['number'] == summary['best_trial'] else ''}",
            r["state"].lower(),
            *(format_value(r["params"].get(n)) for n in names),
            format_value(value) + ("" if r["value"] is not None or value is None else " (best)"),
            format_value(r["accuracy"]),
            format_value(r["examples_seen"]),
            note,
        ]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *lines]]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_value(value: Any) -> str:
    """Compact and readable: 3 significant digits for small numbers, '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def write_results(summary: dict[str, Any], results_dir: str | Path) -> Path:
    return _write_atomic(Path(results_dir) / RESULTS_FILE, yaml.safe_dump(summary, sort_keys=False, default_flow_style=None, width=120))


def write_report(study: optuna.Study, *, metric: str, n_trials: int, results_dir: str | Path, plots: bool = True, print_fn=print) -> dict[str, Any]:
    """study_results.yaml (and plots) from the storage; prints the trials table. Returns the summary."""
    summary = summarize(study, metric=metric, n_trials=n_trials, results_dir=results_dir)
    if plots and summary["trials"]:
        from lit_sft.study.plots import make_plots

        summary["plots"], summary["plots_skipped"] = make_plots(study, summary, results_dir)
    summary["results_file"] = str(write_results(summary, results_dir))
    print_fn(format_table(summary))
    for line in _closing_lines(summary):
        print_fn(line)
    return summary


def _closing_lines(summary: dict[str, Any]) -> Iterable[str]:
    counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items())
    yield f"study {summary['study']}: {counts or 'no trials'}"
    if summary["best_trial"] is not None:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in summary["best_params"].items())
        acc = f", accuracy {summary['best_accuracy']:.3f}" if summary["best_accuracy"] is not None else ""
        yield f"best: trial {summary['best_trial']} {summary['metric']}={format_value(summary['best_value'])}{acc} ({params})"
    else:
        yield "best: none (no trial completed)"
    for failure in summary["failures"]:
        yield f"failed: trial {failure['number']} ({failure['reason']}): {failure['error']}"
    if summary["best_model"]:
        yield f"best model: {summary['best_model']}"
    yield f"results: {summary['results_file']}"
    if summary.get("plots"):
        yield f"plots: {Path(next(iter(summary['plots'].values()))).parent}"
