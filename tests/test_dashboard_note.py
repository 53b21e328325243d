"""The report's headline reaches optuna-dashboard as the study's note (optuna-dashboard's own save_note)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_sft.study import run
from lit_sft.study.config import StudyConfig
from lit_sft.study.report import format_accuracy
from tests.study_fixtures import set_final_test, simulated_study

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is optional (pip install optuna-dashboard)")


def _note(study) -> str:
    """The study's note as optuna-dashboard reads it from the storage."""
    from optuna_dashboard._note import get_note_from_system_attrs

    return get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), None)["body"]


def test_the_report_headline_is_the_dashboards_study_note(tmp_path: Path):
    results = tmp_path / "results"
    results.mkdir()
    url = f"sqlite:///{results / 'optuna.db'}"
    study = simulated_study(url, results, n_trials=12)
    set_final_test(study, study.best_trial.number)
    study_cfg = StudyConfig.from_dict({"name": "sim", "results_dir": str(results), "storage": url, "n_trials": 12, "plots": False})

    summary = run._report(study, study_cfg)

    note = _note(study)
    best = next(r for r in summary["trials"] if r["number"] == summary["best_trial"])
    assert f"**Best trial**: #{best['number']} (" in note
    assert f"validation accuracy {format_accuracy(best['accuracy'], best['accuracy_ci'])} (95% interval, n={best['accuracy_n']})" in note
    test = summary["test_accuracy"]
    assert f"{format_accuracy(test['accuracy'], test['ci'])} (95% interval, n={test['n']}), trial #{test['trial']}" in note
    first = summary["importance"]["first_rung"]
    top, share = max(first["values"].items(), key=lambda kv: kv[1])
    assert f"fANOVA at the first rung: {top} {share:.2f}" in note
    assert f"{len(first['trials'])} trials at the first rung ({first['examples']:,} examples), pruned included ({first['pruned']} pruned)" in note
    complete = summary["counts"]["complete"]
    assert f"PED-ANOVA (the best 10% against the rest) over the {complete} complete trial" in note
    # A second report (a resumed study) replaces the note rather than adding to it.
    run._report(study, study_cfg)
    assert _note(study) == note


def test_a_study_too_small_to_rank_says_so_in_the_note(tmp_path: Path):
    from lit_sft.study.dashboard_note import note_body
    from lit_sft.study.report import summarize

    study = simulated_study(None, tmp_path, n_trials=3)
    note = note_body(summarize(study, metric="eval/loss", n_trials=3, results_dir=tmp_path))
    assert "not computed: 3 trials reached the first rung; importance needs 4." in note
    assert "Too few trials for the report to rank the parameters yet." in note and "differs" not in note
