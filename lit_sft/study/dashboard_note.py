"""REPORT.md's headline as the study's note in optuna-dashboard (its `save_note`), when it is installed.

optuna-dashboard shows its own importance panel: PED-ANOVA over the complete trials alone, which
under ASHA are a handful. The report's importance is fANOVA at the first rung, over every trial
that reached it, pruned ones included. A user who opens both sees two rankings; the note says
which trials each was fitted on, and why they differ. The final test, which the dashboard shows
only as a JSON string among the study's user attributes, is in the note as a sentence.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from lit_sft.available import has_module
from lit_sft.study.importance import describe, format_numbers
from lit_sft.study.results import format_accuracy, format_value

log = logging.getLogger(__name__)

LABELS = {"first_rung": "at the first rung", "complete": "on the complete trials"}


def save_dashboard_note(study: optuna.Study, summary: dict[str, Any]) -> bool:
    """Write the note where optuna-dashboard reads it; False when optuna-dashboard is not installed."""
    if not has_module("optuna_dashboard"):
        return False
    from optuna_dashboard import save_note

    try:
        save_note(study, note_body(summary))
    except Exception as err:  # the report is written already; a note must not fail the study
        log.warning("optuna-dashboard note not saved: %s", err)
        return False
    return True


def note_body(summary: dict[str, Any]) -> str:
    """The note, in Markdown: best trial, final test, importance and what it was fitted on."""
    parts = [f"## Study `{summary['study']}`: the report's headline", _best(summary), _test(summary), _importance(summary),
             "The full report, with the trials tied with the best and the plots: REPORT.md beside study_results.yaml."]
    return "\n\n".join(p for p in parts if p) + "\n"


def _best(summary: dict[str, Any]) -> str:
    best = next((r for r in summary["trials"] if r["number"] == summary["best_trial"]), None)
    if best is None:
        return "**Best trial**: none yet (no trial has completed)."
    params = ", ".join(f"{name} {format_value(value)}" for name, value in best["params"].items())
    text = f"**Best trial**: #{best['number']} ({params}), `{summary['metric']}` {format_value(best['value'])}"
    if best.get("accuracy") is not None:
        text += f", validation accuracy {format_accuracy(best['accuracy'], best.get('accuracy_ci'))}{_interval_n(best.get('accuracy_n'))}"
    return text + "."


def _interval_n(n: int | None) -> str:
    return f" (95% interval, n={n})" if n else " (95% interval)"


def _test(summary: dict[str, Any]) -> str:
    test = summary.get("test_accuracy")
    if not test:
        return ""
    if test.get("error"):
        return f"**Final test** of trial #{test['trial']}: failed ({test['error']})."
    text = (f"**Final test** (the best model graded once on problems no trial and no selection step saw): "
            f"{format_accuracy(test['accuracy'], test['ci'])}{_interval_n(test['n'])}, trial #{test['trial']}.")
    if test.get("stale"):
        text += " That trial is no longer the best; rerunning the study grades the best one."
    return text


def _importance(summary: dict[str, Any]) -> str:
    importance = summary.get("importance") or {}
    lines = []
    for which in ("first_rung", "complete"):
        data = importance.get(which)
        if data:
            ranked = sorted(data["values"].items(), key=lambda kv: kv[1], reverse=True)
            shares = ", ".join(f"{name} {share:.2f}" for name, share in ranked)
            lines.append(f"- fANOVA {LABELS[which]}: {shares}; fitted on {describe(which, data)}: trials {format_numbers(data['trials'])}.")
        elif which in (importance.get("skipped") or {}):
            lines.append(f"- fANOVA {LABELS[which]}: not computed: {importance['skipped'][which]}.")
    if not lines:
        return ""
    complete = sum(r["state"] == "COMPLETE" for r in summary["trials"])
    panel = f"PED-ANOVA (the best 10% against the rest) over the {complete} complete trial{'s' if complete != 1 else ''} alone"
    if any(importance.get(k) for k in LABELS):
        why = (f"This dashboard's importance panel differs: it is {panel}, which under ASHA are the few that survived "
               "pruning, drawn close together by the sampler. The first-rung figure compares every trial that reached "
               "the first rung at equal examples seen, pruned or not: that is the one the report goes by.")
    else:
        why = (f"Too few trials for the report to rank the parameters yet. This dashboard's importance panel, where it "
               f"shows one, is {panel}: on so few trials it ranks noise as readily as an effect.")
    return f"**Hyperparameter importance** for `{summary['metric']}`:\n\n" + "\n".join(lines) + "\n\n" + why
