"""A study's results as data: the per-trial files, each trial's row, the summary that becomes
study_results.yaml, and the formatting every writer shares (REPORT.md in markdown.py, the plots
in plots.py, the console in report.py and progress.py). It imports none of them.

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

from lit_sft.failures import failure_text
from lit_sft.stats import accuracy_interval, intervals_overlap
from lit_sft.study.budget import MOVED_ATTR, is_baseline, spent

CATEGORIES = ("correct", "wrong_answer", "format_failure")
RESULTS_FILE = "study_results.yaml"
REPORT_FILE = "REPORT.md"
BEST_MODEL_DIR = "best_model"
BEST_MODEL_MARKER = "lit_sft_trial.json"
"""Written beside the best model's weights: which study and trial they are, and its value."""


# ---- per-trial files ------------------------------------------------------------------------

def trial_dir(results_dir: str | Path, study_name: str, number: int) -> Path:
    """Everything one trial writes, keyed by study and trial so workers never collide."""
    return Path(results_dir) / "trials" / study_name / f"trial-{number:04d}"


def write_atomic(path: Path, text: str) -> Path:
    """Write-then-rename: a reader (the report of another worker) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, default=_jsonable))


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


# ---- accuracy and its interval ----------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _rounded(interval: Any) -> list[float] | None:
    return [round(float(interval[0]), 4), round(float(interval[1]), 4)] if interval is not None else None


def accuracy_figures(attrs: dict[str, Any]) -> tuple[float | None, list[float] | None, int | None]:
    """A trial's accuracy, its 95% Wilson interval and n (problems graded), from its user attrs.

    Trials recorded before the interval was carry only the grade counts: every graded problem
    gets exactly one category, so n is their sum and the interval is rebuilt from them.
    """
    categories = attrs.get("categories") if isinstance(attrs.get("categories"), dict) else {}
    n = attrs.get("accuracy_n") or sum(int(categories.get(c, 0)) for c in CATEGORIES) or None
    interval = attrs.get("accuracy_ci")
    if interval is None and "correct" in categories:
        interval = accuracy_interval(categories["correct"], n)
    return _finite(attrs.get("accuracy")), _rounded(interval), n


def format_accuracy(accuracy: float | None, interval: list[float] | None, n: int | None = None) -> str:
    """`0.612 [0.569, 0.654]`: every accuracy shown with its 95% interval, n when asked."""
    if accuracy is None:
        return "-"
    text = f"{accuracy:.3f}"
    if interval is not None:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text + (f" (n={n})" if n else "")


# ---- summary --------------------------------------------------------------------------------


def study_rungs(study: optuna.Study, trials: list[FrozenTrial]) -> list[int]:
    """The pruner's rung positions in examples seen: as the trials recorded them, else the first
    from the pruner this process built (a study loaded without it has none to tell)."""
    for trial in trials:
        if trial.user_attrs.get("rungs"):
            return sorted(int(r) for r in trial.user_attrs["rungs"])
    pruner = study.pruner
    low = getattr(pruner, "_min_resource", None)
    factor = getattr(pruner, "_reduction_factor", None)
    skip = getattr(pruner, "_min_early_stopping_rate", 0)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, factor, skip)):
        return [low * factor**skip]
    return []


def _pruned_rung(trial: FrozenTrial, rungs: list[int]) -> int | None:
    """Index of the rung that pruned the trial (0 = the first); None before any rung or unknown.

    From the rung positions when known. Else from Optuna's rung bookkeeping: a trial judged at a
    rung records it (`completed_rung_<k>`) before it is pruned there.
    """
    at = trial.user_attrs.get("pruned_at")
    if rungs and at is not None:
        passed = [r for r in rungs if r <= at]
        return len(passed) - 1 if passed else None
    completed = sum(key.startswith("completed_rung_") for key in trial.system_attrs)
    return completed - 1 if completed else None


def applied_params(trial: FrozenTrial) -> dict[str, Any]:
    """The values the trial trained with: `trial.params` with any normalised entry (a learning
    rate searched per batch size, lit_sft/search_space.py) replaced by the value applied."""
    applied = trial.user_attrs.get("applied_params")
    return {**trial.params, **applied} if isinstance(applied, dict) else dict(trial.params)


def param_scales(trials: Iterable[FrozenTrial]) -> dict[str, str]:
    """The rules of the normalised entries (`learning_rate = sampled x sqrt(batch_size / 32)`),
    as the trials recorded them; empty when the space searched every value as it is applied."""
    for trial in trials:
        scales = trial.user_attrs.get("param_scales")
        if isinstance(scales, dict) and scales:
            return dict(scales)
    return {}


def trial_row(trial: FrozenTrial, rungs: list[int] | None = None) -> dict[str, Any]:
    attrs = trial.user_attrs
    accuracy, interval, n = accuracy_figures(attrs)
    params = applied_params(trial)
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name,
        # What the trial trained with; the sampler's own (normalised) values follow when they differ.
        "params": params,
        # Optuna stores a pruned trial's last report as its value; only a complete trial has an objective.
        "value": _finite(trial.value) if trial.state == TrialState.COMPLETE else None,
        "best_objective": _finite(attrs.get("best_objective")),
        "accuracy": accuracy,
        "accuracy_ci": interval,
        "accuracy_n": n,
        "accuracy_step": attrs.get("accuracy_step"),
        "tied_with_best": None,
        "categories": attrs.get("categories"),
        "best_step": attrs.get("best_step"),
        "best_examples_seen": attrs.get("best_examples_seen"),
        "examples_seen": attrs.get("examples_seen"),
        "examples_budget": attrs.get("examples_budget"),
        "stopped_early": attrs.get("stopped_early"),
        "duration_s": round(trial.duration.total_seconds(), 1) if trial.duration else None,
    }
    if params != dict(trial.params):
        row["sampled_params"] = dict(trial.params)
    if trial.state == TrialState.PRUNED:
        row["pruned_at"] = attrs.get("pruned_at")
        row["pruned_rung"] = _pruned_rung(trial, rungs or [])
    if trial.state == TrialState.FAIL:
        row["error"] = attrs.get("error", "no error recorded (the worker died or was interrupted)")
        row["reason"] = attrs.get("reason", "stale" if "error" not in attrs else "exception")
    return row


def mark_ties(rows: list[dict[str, Any]], best_number: int | None) -> list[int]:
    """Set `tied_with_best` on every other trial with an interval: whether it overlaps the best's.

    Overlapping 95% intervals do not prove equal accuracy, but with this n the data cannot rank
    them: a tied trial is as good a pick as the best on accuracy. Returns the tied trials.
    """
    best = next((r for r in rows if r["number"] == best_number), None)
    if best is None or best["accuracy_ci"] is None:
        return []
    for row in rows:
        if row is not best and row["accuracy_ci"] is not None:
            row["tied_with_best"] = intervals_overlap(row["accuracy_ci"], best["accuracy_ci"])
    return [r["number"] for r in rows if r["tied_with_best"]]


def final_test(study: optuna.Study, best_number: int | None) -> dict[str, Any] | None:
    """The final test result (study attr `final_test`), flagged stale when it graded another
    trial than the current best: a resumed study can find a new best after the test ran."""
    test = study.user_attrs.get("final_test")
    if not isinstance(test, dict):
        return None
    out: dict[str, Any] = {"trial": test.get("trial")}
    if test.get("error"):
        out["error"] = str(test["error"])
    else:
        categories = test.get("categories") if isinstance(test.get("categories"), dict) else None
        n = test.get("n") or (sum(int(v) for v in categories.values()) if categories else None)
        interval = test.get("accuracy_ci") or (accuracy_interval(categories.get("correct"), n) if categories else None)
        out.update(accuracy=_finite(test.get("accuracy")), ci=_rounded(interval), n=n, categories=categories,
                   format_accuracy=_finite(test.get("format_accuracy")), source=test.get("source"))
    out["stale"] = out["trial"] != best_number
    if out["stale"]:
        now = f"trial {best_number} is" if best_number is not None else "no trial is"
        out["note"] = f"graded trial {out['trial']}, but {now} the best now"
    return out


def _full_budget(rows: list[dict[str, Any]]) -> int | None:
    """A complete trial that did not stop early trained its whole budget: the estimate for
    trials that did not record theirs."""
    full = [r["examples_seen"] for r in rows if r["state"] == "COMPLETE" and r["stopped_early"] is False and r["examples_seen"]]
    return max(full) if full else None


def pruning_savings(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Examples the complete and pruned trials trained, against their full budgets."""
    counted = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r["examples_seen"] is not None]
    estimate = _full_budget(counted)
    budgets = [r["examples_budget"] or estimate for r in counted]
    if not counted or None in budgets:
        return None
    saved = {state: sum(b - r["examples_seen"] for r, b in zip(counted, budgets) if r["state"] == state) for state in ("PRUNED", "COMPLETE")}
    return {
        "trials": len(counted),
        "examples_trained": sum(r["examples_seen"] for r in counted),
        "examples_full_budget": sum(budgets),
        "saved_by_pruning": saved["PRUNED"],
        "saved_by_early_stopping": saved["COMPLETE"],
        "budget_estimated": any(not r["examples_budget"] for r in counted),
    }


def budget_summary(trials: list[FrozenTrial], total_examples: int | None) -> dict[str, Any]:
    """The examples the study trained over all trials, against its budget."""
    used = spent(trials, total_examples)
    return {"total_examples": total_examples, "spent_examples": used.examples, "left_examples": used.left}


def baseline_summary(rows: list[dict[str, Any]], trials: list[FrozenTrial], best_number: int | None) -> dict[str, Any] | None:
    """The baseline trial (the config's own hyperparameters) against the best trial: values,
    accuracies with their intervals, and whether the intervals overlap."""
    trial = next((t for t in trials if is_baseline(t) and t.state != TrialState.WAITING), None)
    if trial is None:
        return None
    row = next(r for r in rows if r["number"] == trial.number)
    best = next((r for r in rows if r["number"] == best_number), None)
    out: dict[str, Any] = {
        "trial": trial.number, "state": row["state"], "params": row["params"],
        "moved_into_space": trial.user_attrs.get(MOVED_ATTR) or {},
        "value": objective_of(row), "accuracy": row["accuracy"], "accuracy_ci": row["accuracy_ci"], "accuracy_n": row["accuracy_n"],
    }
    if best is not None and best is not row:
        out["best_minus_baseline"] = {
            "value": None if out["value"] is None or best["value"] is None else best["value"] - out["value"],
            "accuracy": None if row["accuracy"] is None or best["accuracy"] is None else round(best["accuracy"] - row["accuracy"], 4),
        }
        if row["accuracy_ci"] is not None and best["accuracy_ci"] is not None:
            out["accuracy_intervals_overlap"] = intervals_overlap(row["accuracy_ci"], best["accuracy_ci"])
    elif best is row:
        out["best_is_baseline"] = True
    return out


def summarize(study: optuna.Study, *, metric: str, n_trials: int | None, results_dir: str | Path,
              total_examples: int | None = None) -> dict[str, Any]:
    from lit_sft.study.importance import importances

    trials = study.get_trials(deepcopy=False)
    rungs = study_rungs(study, trials)
    rows = [trial_row(t, rungs) for t in trials]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    best_row = next((r for r in rows if best is not None and r["number"] == best.number), None)
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    summary: dict[str, Any] = {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": metric,
        "n_trials": n_trials,
        "budget": budget_summary(trials, total_examples),
        "counts": {k: v for k, v in counts.items() if v},
        "best_trial": best.number if best else None,
        "best_value": _finite(best.value) if best else None,
        "best_params": applied_params(best) if best else None,
        "best_accuracy": best_row["accuracy"] if best_row else None,
        "best_accuracy_ci": best_row["accuracy_ci"] if best_row else None,
        "best_accuracy_n": best_row["accuracy_n"] if best_row else None,
        "best_categories": best_row["categories"] if best_row else None,
        "tied_with_best": mark_ties(rows, best_row["number"] if best_row else None),
        "param_scales": param_scales(trials),
        "test_accuracy": final_test(study, best.number if best else None),
        "test_skipped": None,
        "baseline": baseline_summary(rows, trials, best_row["number"] if best_row else None),
        "best_model": None,
        "rungs": rungs,
        "pruning": pruning_savings(rows),
        "importance": importances(study, trials, rungs),
        "trials": rows,
        "failures": [{"number": r["number"], "reason": r["reason"], "error": r["error"]} for r in rows if r["state"] == "FAIL"],
    }
    if summary["test_accuracy"] is None and best is not None:
        summary["test_skipped"] = study.user_attrs.get("final_test_skipped")  # why there is no test (study/final_test.py)
    marker = Path(results_dir) / BEST_MODEL_DIR / BEST_MODEL_MARKER
    if best is not None and marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("study") == study.study_name and saved.get("trial") == best.number:
            summary["best_model"] = str(marker.parent)
    return summary


def objective_of(row: dict[str, Any]) -> float | None:
    """A complete trial's value, else (pruned) the best value it reached before it stopped."""
    return row["value"] if row["value"] is not None else row["best_objective"]


def trial_note(row: dict[str, Any]) -> str:
    """Where the trial ended (or why it failed), and whether its accuracy ties the best's."""
    notes = []
    if row["state"] == "PRUNED" and row.get("pruned_at") is not None:
        notes.append(f"pruned at {row['pruned_at']:,} examples")
    elif row["state"] == "FAIL":
        notes.append(failure_text(row["reason"], row["error"])[:80])
    elif row["state"] == "COMPLETE" and row.get("best_examples_seen") is not None:
        notes.append(f"best at {row['best_examples_seen']:,} examples")
    if row["tied_with_best"]:
        notes.append("tied with the best (95%)")
    return "; ".join(notes)


def format_value(value: Any) -> str:
    """Compact and readable: 3 significant digits for small numbers, '-' for none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


class _PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors: the best trial's figures are the same objects as its row's, and a
    reader of the file should see the numbers twice, not a reference."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_results(summary: dict[str, Any], results_dir: str | Path) -> Path:
    text = yaml.dump(summary, Dumper=_PlainDumper, sort_keys=False, default_flow_style=None, width=120)
    return write_atomic(Path(results_dir) / RESULTS_FILE, text)


def load_histories(results_dir: str | Path, summary: dict[str, Any]) -> dict[int, dict[str, list[dict]]]:
    return {r["number"]: load_history(results_dir, summary["study"], r["number"]) for r in summary["trials"]}


def budget_line(budget: dict[str, Any]) -> str:
    """`41,216 of 100,000 examples spent (58,784 left)`, or the examples trained without a budget."""
    if budget["total_examples"] is None:
        return f"{budget['spent_examples']:,} examples trained (no budget.total_examples)"
    return f"{budget['spent_examples']:,} of {budget['total_examples']:,} examples spent ({budget['left_examples']:,} left)"


def baseline_line(baseline: dict[str, Any], metric: str) -> str:
    """The baseline trial in one line: its values, and the best trial's gain over it."""
    shown = ", ".join(f"{k}={format_value(v)}" for k, v in baseline["params"].items())
    acc = baseline["accuracy"]
    acc_text = f", accuracy {format_accuracy(acc, baseline['accuracy_ci'], baseline['accuracy_n'])}" if acc is not None else ""
    text = f"trial {baseline['trial']} (your config: {shown}) {baseline['state'].lower()}, {metric}={format_value(baseline['value'])}{acc_text}"
    if baseline.get("best_is_baseline"):
        return text + "; no trial beat it"
    gain = baseline.get("best_minus_baseline")
    if gain:
        parts = []
        if gain["value"] is not None:
            parts.append(f"{metric} {gain['value']:+.4g}")
        if gain["accuracy"] is not None:
            overlap = baseline.get("accuracy_intervals_overlap")
            parts.append(f"accuracy {gain['accuracy'] * 100:+.1f} points" + (" (95% intervals overlap)" if overlap else " (95% intervals apart)" if overlap is False else ""))
        if parts:
            text += "; best trial vs baseline: " + ", ".join(parts)
    moved = baseline.get("moved_into_space") or {}
    if moved:
        text += "; moved into the search space: " + ", ".join(f"{k} {format_value(a)} -> {format_value(b)}" for k, (a, b) in moved.items())
    return text


def baseline_verdict(baseline: dict[str, Any], metric: str) -> str:
    """How much better the best trial is than the baseline, in a sentence."""
    gain = baseline.get("best_minus_baseline") or {}
    parts = []
    if gain.get("value") is not None:
        parts.append(f"`{metric}` {gain['value']:+.4g}")
    if gain.get("accuracy") is not None:
        overlap = baseline.get("accuracy_intervals_overlap")
        note = " (the 95% intervals overlap: the data cannot rank them on accuracy)" if overlap else " (the 95% intervals do not overlap)" if overlap is False else ""
        parts.append(f"accuracy {gain['accuracy'] * 100:+.1f} points{note}")
    return ("The best trial against it: " + ", ".join(parts) + ".") if parts else ""

