"""REPORT.md: the study for people, as GitHub renders Markdown.

Every number and sentence is computed from the summary (what study_results.yaml holds) and the
per-trial histories. A section or observation the data cannot support is left out, not filled
with a placeholder: an old study without intervals, or a study without an evaluator, gets a
shorter report, never a wrong one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lit_sft.stats import intervals_overlap
from lit_sft.study.importance import describe, format_numbers
from lit_sft.study.results import (
    baseline_verdict,
    budget_line,
    REPORT_FILE,
    format_accuracy,
    format_value,
    objective_of,
    trial_note,
    write_atomic,
)

Histories = dict[int, dict[str, list[dict]]]

PLOT_TITLES = {
    "eval_accuracy.png": "Validation accuracy per trial",
    "categorization.png": "Grades per trial",
    "training_loss.png": "Loss curves",
    "hyperparam_comparison.png": "Hyperparameters of every trial",
    "optimization_history.png": "Optimization history",
    "intermediate_values.png": "Values reported to the pruner",
}
"""The plots of the Plots section, in order; param_importances.png sits in its own section."""

TRIALS_FOR_A_RANKING = 10
"""The importance table is shown whenever it could be fitted, with its trial count beside it; a
sentence naming the most important parameter waits for this many trials, as a handful of points
ranks noise as readily as an effect."""

DIVERGED = "diverged: a non-finite loss, or a last eval/loss above the trial's first"


def write_markdown(summary: dict[str, Any], histories: Histories, results_dir: str | Path) -> Path:
    return write_atomic(Path(results_dir) / REPORT_FILE, render(summary, histories))


def render(summary: dict[str, Any], histories: Histories) -> str:
    sections = [
        _header(summary), _best(summary), _baseline(summary), _final_test(summary), _tied(summary), _savings(summary),
        _importance(summary), _per_batch_size(summary), _observations(summary, histories), _plots(summary),
        _all_trials(summary),
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


# ---- helpers ----------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    # A pipe would end the cell; a newline would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _accuracy(row: dict[str, Any], with_n: bool = False) -> str:
    return format_accuracy(row.get("accuracy"), row.get("accuracy_ci"), row.get("accuracy_n") if with_n else None)


def _rows(summary: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {r["number"]: r for r in summary["trials"]}


def _best_row(summary: dict[str, Any]) -> dict[str, Any] | None:
    return _rows(summary).get(summary["best_trial"]) if summary["best_trial"] is not None else None


def _graded_best(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The best trial's row if its accuracy is known (the sections that compare accuracies need it)."""
    best = _best_row(summary)
    return best if best is not None and best["accuracy_ci"] is not None else None


def _param_names(summary: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(name for r in summary["trials"] for name in r["params"]))


def _numbers(numbers) -> str:
    return ", ".join(f"#{n}" for n in numbers)


def _grades(categories: dict[str, int]) -> str:
    """`194 correct, 6 wrong answers, 0 format failures`."""
    names = {"wrong_answer": "wrong answer", "format_failure": "format failure"}
    parts = []
    for key, count in categories.items():
        name = names.get(key, key.replace("_", " "))
        parts.append(f"{count} {name}{'' if count == 1 or key not in names else 's'}")
    return ", ".join(parts)


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "-"


# ---- sections ---------------------------------------------------------------------------------


def _header(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items()) or "none yet"
    total = sum(summary["counts"].values())
    goal = "lowest" if summary["direction"] == "minimize" else "highest"
    cap = f"{total} of {summary['n_trials']} trials" if summary.get("n_trials") else f"{total} trials"
    budget = summary.get("budget")
    spent = f" Compute: {budget_line(budget)}." if budget else ""
    return (
        f"# Study `{summary['study']}`\n\n"
        f"{cap}: {counts}.{spent} Objective: the {goal} `{summary['metric']}` "
        "(a trial's value is its best evaluation). Accuracies are validation accuracies with their 95% "
        "Wilson interval [low, high] over the n problems graded." + _normalised(summary)
    )


def _normalised(summary: dict[str, Any]) -> str:
    """The sentence that says which values were searched normalised, so no reader takes a
    learning rate in the tables for the sampler's value, or the other way round."""
    scales = summary.get("param_scales") or {}
    if not scales:
        return ""
    names = ", ".join(f"`{n}`" for n in scales)
    rules = "; ".join(f"`{rule}`" for rule in scales.values())
    return (f" {names} {'was' if len(scales) == 1 else 'were'} searched normalised ({rules}): every value in "
            "this report and the plots is the one the trial trained with; the sampler's values are in "
            "study_results.yaml (`sampled_params`), and the importance below is of those.")


def _best(summary: dict[str, Any]) -> str:
    best = _best_row(summary)
    if best is None:
        return "## Best trial\n\nNo trial has completed, so there is no best trial yet."
    rows = [[name, format_value(value)] for name, value in best["params"].items()]
    for name, value in (best.get("sampled_params") or {}).items():
        if name in (summary.get("param_scales") or {}):
            rows.append([f"{name} searched (normalised)", format_value(value)])
    rows.append([f"`{summary['metric']}`", format_value(best["value"])])
    if best["accuracy"] is not None:
        rows.append(["validation accuracy", _accuracy(best, with_n=True)])
    if isinstance(best.get("categories"), dict):
        rows.append(["grades", _grades(best["categories"])])
    if best.get("best_examples_seen") is not None:
        rows.append(["best checkpoint", f"{best['best_examples_seen']:,} examples (step {best['best_step']})"])
    if best.get("examples_seen") is not None:
        rows.append(["trained", f"{best['examples_seen']:,} examples" + (", stopped early" if best.get("stopped_early") else "")])
    test = summary.get("test_accuracy")
    if test and not test["stale"] and not test.get("error"):
        source = f", {test['source']}" if test.get("source") else ""
        rows.append(["final test accuracy", f"{format_accuracy(test['accuracy'], test['ci'])} (n={test['n']}{source})"])
    if summary.get("best_model"):
        # Beside this file: a relative link works on GitHub and in a copied results folder alike.
        name = Path(summary["best_model"]).name
        rows.append(["saved model", f"[`{name}/`]({name})"])
    return f"## Best trial: #{best['number']}\n\n" + _table(["", ""], rows)


def _baseline(summary: dict[str, Any]) -> str | None:
    """The config's own hyperparameters (trial 0, run in full) against the best trial."""
    base = summary.get("baseline")
    if not base:
        return None
    best = _best_row(summary)
    metric = summary["metric"]
    header = ["", f"baseline: trial {base['trial']} (your config)"]
    rows = [[name, format_value(value)] for name, value in base["params"].items()]
    rows.append([f"`{metric}`", format_value(base["value"]) + ("" if base["state"] == "COMPLETE" else f" ({base['state'].lower()})")])
    if base["accuracy"] is not None:
        rows.append(["validation accuracy", format_accuracy(base["accuracy"], base["accuracy_ci"], base["accuracy_n"])])
    text = "## Against your config\n\nTrial 0 runs the config's own hyperparameters in full (`study.baseline_trial`). "
    if base.get("best_is_baseline"):
        return text + "No trial beat it: your config is the best found.\n\n" + _table(header, rows)
    if best is not None:
        header.append(f"best: trial {best['number']}")
        values = {name: format_value(value) for name, value in best["params"].items()}
        for row in rows[: len(base["params"])]:
            row.append(values.get(row[0], "-"))
        rows[len(base["params"])].append(format_value(best["value"]))
        if base["accuracy"] is not None:
            rows[-1].append(format_accuracy(best["accuracy"], best["accuracy_ci"], best["accuracy_n"]) if best["accuracy"] is not None else "-")
        text += baseline_verdict(base, metric)
    moved = base.get("moved_into_space") or {}
    if moved:
        text += (" Outside the search space, so moved to the nearest value in it: "
                 + ", ".join(f"`{k}` {format_value(a)} -> {format_value(b)}" for k, (a, b) in moved.items()) + ".")
    return text + "\n\n" + _table(header, [r + ["-"] * (len(header) - len(r)) for r in rows])


def _final_test(summary: dict[str, Any]) -> str:
    """Only what the best trial's table cannot say: a failed or a stale final test."""
    test = summary.get("test_accuracy")
    if not test and summary.get("test_skipped"):
        return f"## Final test\n\nNone: {summary['test_skipped']}."
    if not test or (not test["stale"] and not test.get("error")):
        return ""
    if test.get("error"):
        parts = [f"The final test of trial {test['trial']} failed: {test['error']}."]
    else:
        source = f", {test['source']}" if test.get("source") else ""
        result = f"{format_accuracy(test['accuracy'], test['ci'])} (n={test['n']}{source})"
        parts = [f"The final test on record graded trial {test['trial']}: {result}."]
    if test["stale"]:
        best = f"trial {summary['best_trial']}" if summary["best_trial"] is not None else "no trial"
        parts.append(f"That is not the best trial's result: {best} is the best now. Rerunning the study grades the best trial.")
    return "## Final test\n\n" + " ".join(parts)


def _tied(summary: dict[str, Any]) -> str:
    best = _graded_best(summary)
    if best is None:
        return ""
    rows = _rows(summary)
    tied = [rows[n] for n in summary["tied_with_best"]]
    head = f"## Tied with the best at 95%\n\nThe best trial's accuracy is {_accuracy(best, with_n=True)}. "
    if not tied:
        return head + "No other trial's interval overlaps it: its accuracy differs from every other graded trial's at 95%."
    names = _param_names(summary)
    table = _table(["trial", "state", *names, summary["metric"], "accuracy [95%]"],
                   [[f"#{r['number']}", r["state"].lower(), *(format_value(r["params"].get(n)) for n in names),
                     format_value(objective_of(r)), _accuracy(r)] for r in tied])
    others = f"{len(tied)} other trial{'s' if len(tied) > 1 else ''}"
    return head + (f"The intervals of {others} overlap it: with this many problems graded, their "
                   f"accuracy cannot be told from the best's.\n\n{table}")


def _savings(summary: dict[str, Any]) -> str:
    s = summary.get("pruning")
    if not s:
        return ""
    full = s["examples_full_budget"]
    estimated = (" (the budget of trials that did not record theirs is taken from the complete trials that "
                 "trained to the end)") if s["budget_estimated"] else ""
    return (
        "## What pruning saved\n\n"
        f"The {s['trials']} complete and pruned trials trained on {s['examples_trained']:,} examples in all. "
        f"At their full budgets they would have trained on {full:,}{estimated}: pruning saved "
        f"{s['saved_by_pruning']:,} examples ({_share(s['saved_by_pruning'], full)}) and early stopping "
        + (f"{s['saved_by_early_stopping']:,} ({_share(s['saved_by_early_stopping'], full)})" if s["saved_by_early_stopping"] else "none")
        + f", so the study cost {_share(s['examples_trained'], full)} of training every trial to the end."
    )


def _importance(summary: dict[str, Any]) -> str:
    importance = summary.get("importance") or {}
    panels = [(k, importance[k]) for k in ("first_rung", "complete") if importance.get(k)]
    skipped = importance.get("skipped") or {}
    if not panels and not skipped:
        return ""
    out = ["## Hyperparameter importance",
           f"fANOVA importance of each hyperparameter for `{summary['metric']}` (shares of the variance it explains), fitted on:"]
    labels = {"first_rung": "First rung", "complete": "Complete trials"}
    fitted = [f"- **{labels[k]}**: {describe(k, d)}: trials {format_numbers(d['trials'])}." for k, d in panels]
    fitted += [f"- **{labels[k]}**: not computed: {why}." for k, why in skipped.items()]
    first = importance.get("first_rung")
    if first and first.get("nonfinite"):
        fitted.append(f"- {first['nonfinite']} of the first-rung trials had a non-finite value there (diverged); it counts as the worst value at the rung.")
    out.append("\n".join(fitted))
    if panels:
        names = list(dict.fromkeys(n for _, data in panels for n in sorted(data["values"], key=data["values"].get, reverse=True)))
        out.append(_table(["parameter", *(labels[k].lower() for k, _ in panels)],
                          [[n, *(f"{d['values'][n]:.2f}" if n in d["values"] else "-" for _, d in panels)] for n in names]))
    if "param_importances.png" in (summary.get("plots") or {}):
        out.append("![Hyperparameter importance](plots/param_importances.png)")
    return "\n\n".join(out)


def _per_batch_size(summary: dict[str, Any]) -> str:
    """The best learning rate at each batch size: the two interact, so one best pair hides the rest."""
    rows = [r for r in summary["trials"] if "batch_size" in r["params"] and "learning_rate" in r["params"]
            and r["state"] in ("COMPLETE", "PRUNED") and objective_of(r) is not None]
    if not rows:
        return ""
    pick = min if summary["direction"] == "minimize" else max
    table = []
    for size in sorted({r["params"]["batch_size"] for r in rows}):
        group = [r for r in rows if r["params"]["batch_size"] == size]
        best = pick(group, key=objective_of)
        value = format_value(objective_of(best))
        if best["state"] == "PRUNED":
            value += f" (best before pruning at {best['pruned_at']:,} examples)" if best.get("pruned_at") else " (pruned)"
        table.append([size, len(group), f"#{best['number']}", format_value(best["params"]["learning_rate"]), value, _accuracy(best)])
    return ("## Best learning rate per batch size\n\nAt each batch size, the trial with the best "
            f"`{summary['metric']}` (a pruned trial by the best value it reached) among the trials run at that size.\n\n"
            + _table(["batch_size", "trials", "best trial", "learning_rate", summary["metric"], "accuracy [95%]"], table))


def _observations(summary: dict[str, Any], histories: Histories) -> str:
    found = [_pruned_at_first_rung(summary), _divergence(summary, histories), _format_failures(summary, histories),
             _ties(summary), _more_accurate_than_best(summary), _test_vs_validation(summary), _importance_ranking(summary)]
    found = [f for f in found if f]
    return "## Observations\n\n" + "\n".join(f"- {f}" for f in found) if found else ""


def _plots(summary: dict[str, Any]) -> str:
    drawn = summary.get("plots") or {}
    out = ["## Plots"]
    out += [f"### {title}\n\n![{title}](plots/{name})" for name, title in PLOT_TITLES.items() if name in drawn]
    skipped = summary.get("plots_skipped") or {}
    if skipped:
        out.append("Not drawn: " + "; ".join(f"`{name}` ({why})" for name, why in skipped.items()) + ".")
    return "\n\n".join(out) if len(out) > 1 else ""


def _all_trials(summary: dict[str, Any]) -> str:
    names = _param_names(summary)
    rows = []
    for r in summary["trials"]:
        value = format_value(objective_of(r)) + (" (best before pruning)" if r["value"] is None and objective_of(r) is not None else "")
        number = f"**#{r['number']}** (best)" if r["number"] == summary["best_trial"] else f"#{r['number']}"
        seen = f"{r['examples_seen']:,}" if r.get("examples_seen") is not None else "-"
        rows.append([number, r["state"].lower(), *(format_value(r["params"].get(n)) for n in names), value, _accuracy(r), seen, trial_note(r)])
    if not rows:
        return ""
    return "## All trials\n\n" + _table(["trial", "state", *names, summary["metric"], "accuracy [95%]", "examples", "note"], rows)


# ---- observations: each returns a sentence, or None when the data does not support one -------


def _pruned_at_first_rung(summary: dict[str, Any]) -> str | None:
    finished = [r for r in summary["trials"] if r["state"] in ("COMPLETE", "PRUNED")]
    pruned = [r for r in finished if r["state"] == "PRUNED"]
    if not pruned:
        return None
    first = sum(r.get("pruned_rung") == 0 for r in pruned)
    later = sum((r.get("pruned_rung") or 0) > 0 for r in pruned)
    if not first and not later:
        return f"{len(pruned)} of {len(finished)} trials were pruned (at rungs not recorded)."
    where = f" ({summary['rungs'][0]:,} examples)" if summary.get("rungs") else ""
    text = f"{first} of {len(finished)} trials were pruned at the first rung{where}"
    return text + (f", {later} more at a later rung." if later else ".")


def diverged(history: dict[str, list[dict]]) -> bool | None:
    """Whether a trial diverged (see DIVERGED); None when it logged no loss to judge by.

    The first evaluation comes after the first interval of training, so a last eval/loss above
    it means training made the model worse overall, not just a noisy step.
    """
    rows = history.get("history") or []
    losses = [r[k] for r in rows for k in ("train/loss", "eval/loss") if r.get(k) is not None]
    if any(not math.isfinite(float(v)) for v in losses):
        return True
    evals = [float(r["eval/loss"]) for r in sorted(rows, key=lambda r: r.get("step") or 0) if r.get("eval/loss") is not None]
    if len(evals) >= 2:
        return evals[-1] > evals[0]
    return False if losses else None


def _divergence(summary: dict[str, Any], histories: Histories) -> str | None:
    judged = [(r, d) for r in summary["trials"] if (d := diverged(histories.get(r["number"], {}))) is not None]
    bad = [r for r, d in judged if d]
    if not bad:
        return f"None of the {len(judged)} trials with a loss curve diverged ({DIVERGED})." if judged else None
    if not all("learning_rate" in r["params"] for r, _ in judged):
        return f"{len(bad)} of {len(judged)} trials diverged: {_numbers(r['number'] for r in bad)} ({DIVERGED})."
    threshold = min(r["params"]["learning_rate"] for r in bad)
    above = [d for r, d in judged if r["params"]["learning_rate"] >= threshold]
    if all(above) and len(above) < len(judged):
        return (f"Every trial with learning_rate ≥ {format_value(threshold)} diverged ({len(bad)} of {len(judged)}); "
                f"none below it did ({DIVERGED}).")
    listed = ", ".join(f"#{r['number']} (learning_rate {format_value(r['params']['learning_rate'])})" for r in bad)
    return f"{len(bad)} of {len(judged)} trials diverged: {listed} ({DIVERGED})."


def _format_failures(summary: dict[str, Any], histories: Histories) -> str | None:
    best = _best_row(summary)
    if best is None:
        return None
    evals = [e for e in histories.get(best["number"], {}).get("evaluations", [])
             if e.get("status", "ok") == "ok" and e.get("format_failure") is not None
             and (e.get("num_problems") or e.get("correct") is not None)]
    if len(evals) < 2:
        return None
    evals.sort(key=lambda e: e.get("examples_seen") or 0)
    step = best.get("accuracy_step") if best.get("accuracy_step") is not None else best.get("best_step")
    at = next((e for e in evals if e.get("step") == step), evals[-1])
    first = evals[0]
    if at is first:
        return None

    def rate(e: dict) -> float:
        n = e.get("num_problems") or sum(int(e.get(c) or 0) for c in ("correct", "wrong_answer", "format_failure"))
        return e["format_failure"] / n

    a, b = rate(first), rate(at)
    if a == b == 0:
        return None  # never a format failure: nothing to tell
    verb = "fell" if b < a else "rose" if b > a else "stayed"
    span = f"from {a:.1%} to {b:.1%}" if verb != "stayed" else f"at {a:.1%}"
    return (f"Format failures {verb} {span} of the graded problems in the best trial (#{best['number']}), from its first "
            f"evaluation ({first['examples_seen']:,} examples) to its best ({at['examples_seen']:,} examples).")


def _ties(summary: dict[str, Any]) -> str | None:
    best = _graded_best(summary)
    if best is None:
        return None
    others = [r for r in summary["trials"] if r["tied_with_best"] is not None]
    if not others:
        return None
    tied = summary["tied_with_best"]
    which = f" ({_numbers(tied)})" if tied else ""
    return (f"The best trial's accuracy, {_accuracy(best)}, is tied at 95% with {len(tied)} of the "
            f"{len(others)} other graded trials{which}.")


def _more_accurate_than_best(summary: dict[str, Any]) -> str | None:
    """Trials whose accuracy interval lies wholly above the best's: the objective and accuracy disagree."""
    best = _graded_best(summary)
    if best is None:
        return None
    above = [r for r in summary["trials"] if r["accuracy_ci"] and r["accuracy_ci"][0] > best["accuracy_ci"][1]]
    if not above:
        return None
    listed = ", ".join(f"#{r['number']} {_accuracy(r)}" for r in above)
    return (f"{len(above)} trials are more accurate than the best trial ({_accuracy(best)}) beyond the 95% intervals: "
            f"{listed}. The best `{summary['metric']}` did not pick the most accurate model.")


def _test_vs_validation(summary: dict[str, Any]) -> str | None:
    test = summary.get("test_accuracy")
    best = _best_row(summary)
    if not test or test["stale"] or test.get("error") or test.get("accuracy") is None or best is None or best["accuracy"] is None:
        return None
    relation = "the intervals overlap"
    if test["ci"] and best["accuracy_ci"] and not intervals_overlap(test["ci"], best["accuracy_ci"]):
        relation = "test is " + ("below" if test["accuracy"] < best["accuracy"] else "above") + " validation beyond both intervals"
    return (f"The final test accuracy of the best trial is {format_accuracy(test['accuracy'], test['ci'], test['n'])} against "
            f"{_accuracy(best, with_n=True)} on validation: {relation}.")


def _importance_ranking(summary: dict[str, Any]) -> str | None:
    importance = summary.get("importance") or {}
    first = importance.get("first_rung")
    if not first or len(first["trials"]) < TRIALS_FOR_A_RANKING:
        return None
    top, share = max(first["values"].items(), key=lambda kv: kv[1])
    text = (f"At the first rung, {top} carries {share:.0%} of the importance, over {len(first['trials'])} trials "
            f"of which {first['pruned']} were pruned")
    complete = importance.get("complete")
    if complete:
        other, other_share = max(complete["values"].items(), key=lambda kv: kv[1])
        if other != top:
            return text + f"; on the {len(complete['trials'])} complete trials alone {other} ranks first ({other_share:.0%})."
    return text + "."
