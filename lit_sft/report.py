"""What a study leaves behind: study_results.yaml, a trials table, and plots.

Everything is read back from the study's storage and the per-trial files under
`results_dir/trials/<study>/trial-NNNN/`, never from this process's memory, so the report of a
resumed study or of a study run by several workers covers every trial.
"""

from __future__ import annotations

import json
import math
import os
import warnings
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
        value = _objective(r)
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


# ---- plots ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers, and no window per figure
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict[str, Any]) -> str:
    p = row["params"]
    parts = [f"#{row['number']}"]
    if "learning_rate" in p:
        parts.append(f"lr={p['learning_rate']:.1e}")
    if "batch_size" in p:
        parts.append(f"bs={p['batch_size']}")
    if row["state"] != "COMPLETE":
        parts.append(f"({row['state'].lower()})")
    return " ".join(parts)


_LINESTYLE = {"COMPLETE": "-", "PRUNED": "--", "FAIL": ":", "RUNNING": "-."}


def _draw_curves(plt, ax, rows, histories, key: str, source: str, markers: bool = True) -> int:
    """One line per trial of `key` against examples seen; returns how many trials had points."""
    cmap = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    drawn = 0
    for i, row in enumerate(rows):
        # evaluator rows carry a status; a missing or failed evaluation has no figures
        points = sorted((r["examples_seen"], r[key]) for r in histories[row["number"]][source]
                        if r.get(key) is not None and r.get("examples_seen") is not None and r.get("status", "ok") == "ok")
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, _LINESTYLE.get(row["state"], "-"), color=cmap(i % cmap.N), marker="o" if markers or len(xs) < 3 else None,
                markersize=3, linewidth=1.3, label=_label(row))
        drawn += 1
    return drawn


def _plot_losses(plt, rows, histories, metric: str, path: Path) -> bool:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    drawn = _draw_curves(plt, left, rows, histories, "train/loss", "history", markers=False)
    drawn += _draw_curves(plt, right, rows, histories, metric, "history")
    if not drawn:
        plt.close(fig)
        return False
    for ax, title in ((left, "train/loss (logged steps)"), (right, f"{metric} (evaluations; a trial's value is its best)")):
        ax.set_xlabel("examples seen")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y) and y > 0]
        if ys and max(ys) / min(ys) > 10:
            ax.set_yscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.4, not 4x10^-1
            ax.yaxis.set_major_formatter(plain)
            # Minor labels help within a decade or so; over several they overprint each other.
            ax.yaxis.set_minor_formatter(plain if max(ys) / min(ys) < 30 else NullFormatter())
    left.set_ylabel("loss")
    handles, labels = (right if right.get_lines() else left).get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.83, 0.5), frameon=False)
    fig.suptitle("Loss per trial against examples seen (dashed: pruned, dotted: failed)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.83, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_accuracy(plt, rows, histories, path: Path) -> bool:
    fig, ax = plt.subplots(figsize=(9, 5.5))
    if not _draw_curves(plt, ax, rows, histories, "accuracy", "evaluations"):
        plt.close(fig)
        return False
    ax.set_xlabel("examples seen")
    ax.set_ylabel("accuracy")
    ax.set_title("Evaluator accuracy per trial (dashed: pruned)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _objective(row: dict[str, Any]) -> float | None:
    """A complete trial's value, else (pruned) the best value it reached before it stopped."""
    return row["value"] if row["value"] is not None else row["best_objective"]


def _plot_hyperparams(plt, rows, summary, path: Path) -> bool:
    numeric = [n for n in dict.fromkeys(n for r in rows for n in r["params"]) if all(isinstance(r["params"].get(n, 0), (int, float)) for r in rows)]
    x_name = "learning_rate" if "learning_rate" in numeric else (numeric[0] if numeric else None)
    y_name = "batch_size" if "batch_size" in numeric else next((n for n in numeric if n != x_name), None)
    placed = [r for r in rows if x_name in r["params"] and y_name in r["params"]]
    if x_name is None or y_name is None or not placed:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colored = [r for r in placed if _objective(r) is not None]
    values = [_objective(r) for r in colored]
    cmap = plt.get_cmap("viridis" if summary["direction"] == "minimize" else "viridis_r")
    norm = plt.Normalize(min(values), max(values)) if values else None
    sc = None
    for state, marker, size in (("COMPLETE", "o", 90), ("PRUNED", "X", 90)):
        group = [(r, v) for r, v in zip(colored, values) if r["state"] == state]
        if group:
            sc = ax.scatter([r["params"][x_name] for r, _ in group], [r["params"][y_name] for r, _ in group], c=[v for _, v in group], cmap=cmap, norm=norm, marker=marker, s=size, edgecolors="black", linewidths=0.6, label=state.lower(), zorder=3)
    grey = [r for r in placed if r not in colored]
    if grey:
        ax.scatter([r["params"][x_name] for r in grey], [r["params"][y_name] for r in grey], marker="s", s=70, color="lightgrey", edgecolors="black", linewidths=0.6, label="failed / no value", zorder=3)
    # Trials sharing a y value (a batch size) sit on one row: alternate their labels above and
    # below along the row so neighbours do not overprint each other.
    rank: dict[int, int] = {}
    for y in {r["params"][y_name] for r in placed}:
        row = sorted((r for r in placed if r["params"][y_name] == y), key=lambda r: r["params"][x_name])
        rank.update({r["number"]: i for i, r in enumerate(row)})
    for r in placed:
        ax.annotate(f"#{r['number']}", (r["params"][x_name], r["params"][y_name]),
                    xytext=(6, 6 if rank[r["number"]] % 2 == 0 else -13), textcoords="offset points", fontsize=8)
    best = next((r for r in placed if r["number"] == summary["best_trial"]), None)
    if best is not None:
        ax.scatter([best["params"][x_name]], [best["params"][y_name]], s=300, facecolors="none", edgecolors="red",
                   linewidths=1.5, label=f"best (#{best['number']})", zorder=4)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label=f"{summary['metric']} (pruned: best before pruning)")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    if x_name == "learning_rate":
        ax.set_xscale("log")
        # 1-2-5 labels read well over the one or two decades a learning rate spans
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    if y_name == "batch_size":
        ax.set_yscale("log", base=2)
        ticks = sorted({r["params"][y_name] for r in placed})
        ax.set_yticks(ticks, [str(t) for t in ticks])
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.set_title(f"{x_name} vs {y_name}, coloured by {summary['metric']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_categories(plt, rows, path: Path) -> bool:
    graded = [r for r in rows if isinstance(r.get("categories"), dict)]
    if not graded:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(graded) + 3), 5))
    xs = [f"#{r['number']}" + ("" if r["state"] == "COMPLETE" else f"\n{r['state'].lower()}") for r in graded]
    bottom = [0.0] * len(graded)
    colors = {"correct": "#2ca02c", "wrong_answer": "#d62728", "format_failure": "#7f7f7f"}
    for cat in CATEGORIES:
        heights = [float(r["categories"].get(cat, 0)) for r in graded]
        ax.bar(xs, heights, bottom=bottom, color=colors[cat], label=cat.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("validation problems (at the trial's best step)")
    ax.set_title("Evaluator grades per trial")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_optuna(plt, study: optuna.Study, metric: str, plots_dir: Path, done: dict[str, str], skipped: dict[str, str]) -> None:
    from optuna.visualization import matplotlib as ovm

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    jobs = [
        ("optimization_history.png", ovm.plot_optimization_history, complete >= 1, "no complete trial"),
        ("intermediate_values.png", ovm.plot_intermediate_values, any(t.intermediate_values for t in trials), "no trial reported a value"),
        ("param_importances.png", ovm.plot_param_importances, complete >= 2, "importances need at least 2 complete trials"),
    ]
    for name, plot, ready, why in jobs:
        (plots_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier run would mislead
        if not ready:
            skipped[name] = why
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:
            # e.g. importances when every complete trial has the same parameters
            skipped[name] = f"optuna could not draw it: {err}"
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        if name == "intermediate_values.png":
            ax.set_xlabel("examples seen")
            ax.set_ylabel(metric)
        elif name == "optimization_history.png":
            ax.set_ylabel(metric)
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        fig.savefig(plots_dir / name, dpi=110)
        plt.close(fig)
        done[name] = str(plots_dir / name)


def make_plots(study: optuna.Study, summary: dict[str, Any], results_dir: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Draw every plot the data allows; returns (written name -> path, skipped name -> why)."""
    plt = _pyplot()
    plots_dir = Path(results_dir) / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    rows = summary["trials"]
    histories = {r["number"]: load_history(results_dir, summary["study"], r["number"]) for r in rows}
    done: dict[str, str] = {}
    skipped: dict[str, str] = {}
    own = [
        ("training_loss.png", lambda p: _plot_losses(plt, rows, histories, summary["metric"], p), "no trial logged a loss"),
        ("eval_accuracy.png", lambda p: _plot_accuracy(plt, rows, histories, p), "no evaluator results (evaluator disabled or none finished)"),
        ("hyperparam_comparison.png", lambda p: _plot_hyperparams(plt, rows, summary, p), "needs two numeric parameters and at least one trial"),
        ("categorization.png", lambda p: _plot_categories(plt, rows, p), "no evaluator results (evaluator disabled or none finished)"),
    ]
    for name, draw, why in own:
        path = plots_dir / name
        if draw(path):
            done[name] = str(path)
        else:
            path.unlink(missing_ok=True)  # a stale plot from an earlier run would mislead
            skipped[name] = why
    _plot_optuna(plt, study, summary["metric"], plots_dir, done, skipped)
    return done, skipped


def write_report(study: optuna.Study, *, metric: str, n_trials: int, results_dir: str | Path, plots: bool = True, print_fn=print) -> dict[str, Any]:
    """study_results.yaml (and plots) from the storage; prints the trials table. Returns the summary."""
    summary = summarize(study, metric=metric, n_trials=n_trials, results_dir=results_dir)
    if plots and summary["trials"]:
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
