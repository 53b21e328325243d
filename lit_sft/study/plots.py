"""The study's plots (PNG): loss and accuracy curves, hyperparameters, grades, importance, Optuna's own."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lit_sft.stats import accuracy_interval
from lit_sft.study.importance import describe, format_numbers
from lit_sft.study.results import (
    CATEGORIES,
    format_accuracy,
    load_histories,
    objective_of,
)


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
    # An accuracy objective has its own plot (eval_accuracy.png); this one stays about losses.
    loss = metric if metric.endswith("loss") else "eval/loss"
    drawn += _draw_curves(plt, right, rows, histories, loss, "history")
    if not drawn:
        plt.close(fig)
        return False
    for ax, title in ((left, "train/loss (logged steps)"), (right, f"{loss} (evaluations" + ("; a trial's value is its best)" if loss == metric else ")"))):
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


def _graded(evaluation: dict[str, Any]) -> int | None:
    """Problems an evaluation graded: the evaluator's count, else the sum of its grades."""
    return evaluation.get("num_problems") or sum(int(evaluation.get(c) or 0) for c in CATEGORIES) or None


def _accuracy_points(evaluations: list[dict]) -> list[tuple[int, int | None, float, float, float]]:
    """(examples seen, step, accuracy, low, high) of each finished evaluation, by examples seen."""
    points = []
    for e in evaluations:
        if e.get("status", "ok") != "ok" or e.get("accuracy") is None or e.get("examples_seen") is None:
            continue
        interval = accuracy_interval(e.get("correct"), _graded(e)) or (math.nan, math.nan)
        points.append((e["examples_seen"], e.get("step"), float(e["accuracy"]), *interval))
    return sorted(points, key=lambda p: p[0])


def _yerr(ys, lows, highs) -> list[list[float]]:
    """Error-bar lengths, never negative: at 100% (or 0%) accuracy the Wilson bound equals the value
    up to rounding, a hair on the wrong side of it, and matplotlib refuses a negative length."""
    return [[max(0.0, y - lo) for y, lo in zip(ys, lows)], [max(0.0, hi - y) for y, hi in zip(ys, highs)]]


def _mark_best_checkpoint(ax, row: dict[str, Any], points: list[tuple]) -> None:
    """A star (with its interval) on the evaluation whose accuracy the best trial reports."""
    step = row.get("accuracy_step") if row.get("accuracy_step") is not None else row.get("best_step")
    at = next((p for p in points if p[1] == step), None) or max(points, key=lambda p: p[2])
    x, _, y, low, high = at
    ax.errorbar([x], [y], yerr=_yerr([y], [low], [high]) if math.isfinite(low) else None, fmt="*", markersize=16,
                color="red", markeredgecolor="black", capsize=5, zorder=6,
                label=f"best checkpoint #{row['number']}: {format_accuracy(y, [low, high] if math.isfinite(low) else None)}")


def _plot_accuracy(plt, rows, histories, best_trial: int | None, path: Path) -> bool:
    from matplotlib import patheffects

    fig, ax = plt.subplots(figsize=(10, 5.5))
    cmap = plt.get_cmap("tab20" if len(rows) > 10 else "tab10")
    sizes: set[int | None] = set()
    best_points = None
    for i, row in enumerate(rows):
        evaluations = histories[row["number"]]["evaluations"]
        points = _accuracy_points(evaluations)
        if not points:
            continue
        sizes.update(_graded(e) for e in evaluations if e.get("status", "ok") == "ok")
        xs, _, ys, lows, highs = zip(*points)
        best = row["number"] == best_trial
        color = cmap(i % cmap.N)
        # The best trial keeps its colour (the same as in training_loss.png) inside a black outline.
        outline = [patheffects.withStroke(linewidth=4.5, foreground="black")] if best else None
        ax.plot(xs, ys, _LINESTYLE.get(row["state"], "-"), color=color, marker="o", markersize=3, path_effects=outline,
                linewidth=2.6 if best else 1.3, zorder=4 if best else 3, label=_label(row) + (" (best)" if best else ""))
        if len(xs) > 1:
            ax.fill_between(xs, lows, highs, color=color, alpha=0.25 if best else 0.1, linewidth=0, zorder=2)
        elif math.isfinite(lows[0]):
            ax.errorbar(xs, ys, yerr=_yerr(ys[:1], lows[:1], highs[:1]), fmt="none", ecolor=color, capsize=3)
        if best:
            best_points = (row, points)
    if not ax.get_lines():
        plt.close(fig)
        return False
    if best_points is not None:
        _mark_best_checkpoint(ax, *best_points)
    n = next(iter(sizes)) if len(sizes) == 1 else None
    ax.set_xlabel("examples seen")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Evaluator accuracy per trial; shaded: 95% Wilson interval ({f'n={n}' if n else 'n per evaluation'}; dashed: pruned)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_hyperparams(plt, rows, summary, path: Path) -> bool:
    numeric = [n for n in dict.fromkeys(n for r in rows for n in r["params"]) if all(isinstance(r["params"].get(n, 0), (int, float)) for r in rows)]
    x_name = "learning_rate" if "learning_rate" in numeric else (numeric[0] if numeric else None)
    y_name = "batch_size" if "batch_size" in numeric else next((n for n in numeric if n != x_name), None)
    placed = [r for r in rows if x_name in r["params"] and y_name in r["params"]]
    if x_name is None or y_name is None or not placed:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colored = [r for r in placed if objective_of(r) is not None]
    values = [objective_of(r) for r in colored]
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
    scales = summary.get("param_scales") or {}
    # A normalised entry is drawn at the value the trial trained with; the label says so.
    ax.set_xlabel(f"{x_name} (applied; searched as {scales[x_name]})" if x_name in scales else x_name)
    ax.set_ylabel(f"{y_name} (applied; searched as {scales[y_name]})" if y_name in scales else y_name)
    ax.set_title(f"{x_name} vs {y_name}, coloured by {summary['metric']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bar_label(row: dict[str, Any], best_trial: int | None) -> str:
    notes = ["best" if row["number"] == best_trial else "tied" if row["tied_with_best"] else "",
             "" if row["state"] == "COMPLETE" else row["state"].lower()]
    return "\n".join([f"#{row['number']}", *(n for n in notes if n)])


def _plot_categories(plt, rows, best_trial: int | None, path: Path) -> bool:
    graded = [r for r in rows if isinstance(r.get("categories"), dict) and sum(r["categories"].values()) > 0]
    if not graded:
        return False
    fig, ax = plt.subplots(figsize=(max(9, 0.6 * len(graded) + 3.5), 5.5))
    xs = list(range(len(graded)))
    totals = [sum(float(r["categories"].get(c, 0)) for c in CATEGORIES) for r in graded]
    bottom = [0.0] * len(graded)
    colors = {"correct": "#2ca02c", "wrong_answer": "#d62728", "format_failure": "#7f7f7f"}
    edges = ["black" if r["number"] == best_trial else "none" for r in graded]
    for cat in CATEGORIES:
        heights = [float(r["categories"].get(cat, 0)) / t for r, t in zip(graded, totals)]
        ax.bar(xs, heights, bottom=bottom, color=colors[cat], edgecolor=edges, linewidth=2, label=cat.replace("_", " "))
        bottom = [b + h for b, h in zip(bottom, heights)]
    with_ci = [(x, r) for x, r in zip(xs, graded) if r.get("accuracy_ci")]
    if with_ci:
        shares = [float(r["categories"].get("correct", 0)) / totals[x] for x, r in with_ci]
        ax.errorbar([x for x, _ in with_ci], shares, fmt="none", ecolor="black", capsize=4, linewidth=1.2,
                    yerr=[[max(0.0, s - r["accuracy_ci"][0]) for s, (_, r) in zip(shares, with_ci)],
                          [max(0.0, r["accuracy_ci"][1] - s) for s, (_, r) in zip(shares, with_ci)]],
                    label="correct: 95% Wilson interval")
    best = next((r for r in graded if r["number"] == best_trial and r.get("accuracy_ci")), None)
    if best is not None:
        # The band sits behind the bars; its edges are drawn over them so a tie can be read off.
        ax.axhspan(*best["accuracy_ci"], color="gold", alpha=0.35, zorder=0.5,
                   label=f"best #{best['number']}: {format_accuracy(best['accuracy'], best['accuracy_ci'])}")
        for edge in best["accuracy_ci"]:
            ax.axhline(edge, color="darkgoldenrod", linestyle="--", linewidth=1, zorder=5)
    ax.set_xticks(xs, [_bar_label(r, best_trial) for r in graded], fontsize=8)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("share of graded problems (at the trial's best step)")
    ax.set_title("Evaluator grades per trial\n(a trial whose interval reaches the dashed band is tied with the best)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_importance(plt, summary: dict[str, Any], path: Path) -> bool:
    """fANOVA importances at the first rung (pruned trials included) and, when there are
    enough, on the complete trials; each panel names the trials it used."""
    importance = summary.get("importance") or {}
    panels = [(key, importance[key]) for key in ("first_rung", "complete") if importance.get(key)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (key, data) in zip(axes[0], panels):
        names = sorted(data["values"], key=data["values"].get)
        values = [data["values"][n] for n in names]
        # fANOVA fits the sampler's values: a normalised entry's importance is the normalised one's.
        scales = summary.get("param_scales") or {}
        ax.barh([f"{n} (normalised)" if n in scales else n for n in names], values, color="#1f77b4" if key == "first_rung" else "#9467bd")
        for y, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (v, y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=9)
        ax.set_xlim(0, 1.12)
        ax.set_xlabel("importance (fANOVA, sums to 1)")
        title = describe(key, data).replace(", pruned included", ",\npruned included")
        ax.set_title(f"{title}\ntrials {format_numbers(data['trials'])}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Hyperparameter importance (fANOVA) for {summary['metric']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _mark_rungs(ax, rungs: list[int]) -> None:
    """The pruner's rungs as vertical lines: where the values it judged were taken."""
    low, high = ax.get_xlim()
    for k, rung in enumerate(rungs):
        if low <= rung <= high:
            ax.axvline(rung, color="black", linestyle=":", linewidth=1)
            ax.annotate(f"rung {k}", (rung, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8)


def _plot_optuna(plt, study: optuna.Study, metric: str, rungs: list[int], plots_dir: Path, done: dict[str, str], skipped: dict[str, str]) -> None:
    from optuna.visualization import matplotlib as ovm

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    jobs = [
        ("optimization_history.png", ovm.plot_optimization_history, complete >= 1, "no complete trial"),
        ("intermediate_values.png", ovm.plot_intermediate_values, any(t.intermediate_values for t in trials), "no trial reported a value"),
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
            _mark_rungs(ax, rungs)
        elif name == "optimization_history.png":
            ax.set_ylabel(metric)
        fig.set_size_inches(9, 5.5)
        fig.tight_layout()
        fig.savefig(plots_dir / name, dpi=110)
        plt.close(fig)
        done[name] = str(plots_dir / name)


def make_plots(study: optuna.Study, summary: dict[str, Any], results_dir: str | Path,
               histories: dict[int, dict[str, list[dict]]] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Draw every plot the data allows; returns (written name -> path, skipped name -> why)."""
    plt = _pyplot()
    plots_dir = Path(results_dir) / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    rows = summary["trials"]
    best = summary["best_trial"]
    histories = histories if histories is not None else load_histories(results_dir, summary)
    done: dict[str, str] = {}
    skipped: dict[str, str] = {}
    no_importance = "; ".join((summary.get("importance") or {}).get("skipped", {}).values()) or "no importance computed"
    own = [
        ("training_loss.png", lambda p: _plot_losses(plt, rows, histories, summary["metric"], p), "no trial logged a loss"),
        ("eval_accuracy.png", lambda p: _plot_accuracy(plt, rows, histories, best, p), "no evaluator results (evaluator disabled or none finished)"),
        ("hyperparam_comparison.png", lambda p: _plot_hyperparams(plt, rows, summary, p), "needs two numeric parameters and at least one trial"),
        ("categorization.png", lambda p: _plot_categories(plt, rows, best, p), "no evaluator results (evaluator disabled or none finished)"),
        ("param_importances.png", lambda p: _plot_importance(plt, summary, p), no_importance),
    ]
    for name, draw, why in own:
        path = plots_dir / name
        if draw(path):
            done[name] = str(path)
        else:
            path.unlink(missing_ok=True)  # a stale plot from an earlier run would mislead
            skipped[name] = why
    _plot_optuna(plt, study, summary["metric"], summary.get("rungs") or [], plots_dir, done, skipped)
    return done, skipped
