"""REPORT.md: sections, numbers computed from the study, links that resolve, observations only
where the data supports them."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from lit_sft.study import markdown
from lit_sft.study.report import write_report
from tests.study_fixtures import (
    DIVERGES_ABOVE,
    PROBLEMS,
    set_final_test,
    simulated_study,
)

SECTIONS = ["## Best trial: #", "## Tied with the best at 95%", "## What pruning saved", "## Hyperparameter importance",
            "## Best learning rate per batch size", "## Observations", "## Plots", "## All trials"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    results = tmp_path_factory.mktemp("sim") / "results"
    study = simulated_study(None, results)
    set_final_test(study, study.best_trial.number)
    summary = write_report(study, metric="eval/loss", n_trials=12, results_dir=results, print_fn=lambda _: None)
    return study, summary, results, (results / "REPORT.md").read_text()


def test_sections_in_order_and_no_raw_dumps(report):
    _, _, _, text = report
    places = [text.index(s) for s in SECTIONS]
    assert places == sorted(places)
    assert text.startswith("# Study `sim`\n")
    for raw in ("{'", "nan", "[]"):
        assert raw not in text
    assert not re.search(r"\bNone\b(?! of the)", text)  # "None of the N trials diverged" is prose


def test_images_are_relative_links_to_drawn_plots(report):
    _, summary, results, text = report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "plots/param_importances.png" in links and "plots/eval_accuracy.png" in links
    assert set(links) == {f"plots/{name}" for name in summary["plots"]}
    for link in links:
        assert (results / link).is_file()


def test_numbers_come_from_the_study(report):
    study, summary, _, text = report
    best = study.best_trial
    low, high = best.user_attrs["accuracy_ci"]
    assert f"## Best trial: #{best.number}" in text
    assert f"| validation accuracy | {best.user_attrs['accuracy']:.3f} [{low:.3f}, {high:.3f}] (n={PROBLEMS}) |" in text
    trained = sum(t.user_attrs["examples_seen"] for t in study.trials)
    assert f"trained on {trained:,} examples in all" in text
    assert f"would have trained on {20000 * len(study.trials):,}" in text
    test = study.user_attrs["final_test"]
    assert f"| final test accuracy | {test['accuracy']:.3f} [{test['accuracy_ci'][0]:.3f}, {test['accuracy_ci'][1]:.3f}]" in text
    first = summary["importance"]["first_rung"]
    assert f"{len(study.trials)} trials at the first rung (4,000 examples), pruned included ({first['pruned']} pruned)" in text


def test_best_learning_rate_per_batch_size(report):
    study, _, _, text = report
    table = text.split("## Best learning rate per batch size")[1].split("##")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| batch_size")]
    sizes = sorted({t.params["batch_size"] for t in study.trials})
    assert [int(line.split("|")[1]) for line in lines] == sizes
    for size, line in zip(sizes, lines):
        group = [t for t in study.trials if t.params["batch_size"] == size]
        best = min(group, key=lambda t: t.user_attrs["best_objective"])
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[1] == str(len(group)) and cells[2] == f"#{best.number}"


def test_observations_computed_from_the_data(report):
    study, summary, _, text = report
    observations = text.split("## Observations")[1].split("\n## ")[0]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    at_first = sum(t.user_attrs["pruned_at"] < 12000 for t in pruned)
    assert f"{at_first} of {len(study.trials)} trials were pruned at the first rung (4,000 examples)" in observations
    diverging = [t for t in study.trials if t.params["learning_rate"] > DIVERGES_ABOVE]
    assert diverging, "the simulated study should sample a diverging learning rate"
    threshold = min(t.params["learning_rate"] for t in diverging)
    assert f"Every trial with learning_rate ≥ {markdown.format_value(threshold)} diverged ({len(diverging)} of {len(study.trials)})" in observations
    assert "Format failures fell from " in observations
    tied = summary["tied_with_best"]
    assert f"is tied at 95% with {len(tied)} of the" in observations
    assert "The final test accuracy of the best trial is" in observations
    share = summary["importance"]["first_rung"]["values"]["learning_rate"]
    assert f"At the first rung, learning_rate carries {share:.0%} of the importance, over 12 trials" in observations


def test_yaml_and_report_agree_on_ties(report):
    _, summary, results, text = report
    data = yaml.safe_load((results / "study_results.yaml").read_text())
    assert data["tied_with_best"] == summary["tied_with_best"]
    tied_section = text.split("## Tied with the best at 95%")[1].split("\n## ")[0]
    assert [int(n) for n in re.findall(r"^\| #(\d+) ", tied_section, flags=re.MULTILINE)] == summary["tied_with_best"]


# ---- observations, one by one, on hand-made summaries ------------------------------------------


def _row(number, lr, state="COMPLETE", **extra):
    row = {"number": number, "state": state, "params": {"learning_rate": lr, "batch_size": 8}, "value": 1.0, "best_objective": 1.0,
           "accuracy": None, "accuracy_ci": None, "accuracy_n": None, "tied_with_best": None, "categories": None,
           "examples_seen": 1000, "pruned_at": None}
    row.update(extra)
    return row


def _losses(*values):
    return {"history": [{"step": i, "eval/loss": v} for i, v in enumerate(values)], "evaluations": []}


def test_divergence_threshold_only_when_it_is_one():
    summary = {"trials": [_row(0, 1e-3), _row(1, 1e-2), _row(2, 3e-2)]}
    clean = {0: _losses(2.0, 1.0), 1: _losses(2.0, 2.5), 2: _losses(2.0, math.nan)}
    assert markdown._divergence(summary, clean).startswith("Every trial with learning_rate ≥ 0.01 diverged (2 of 3); none below it did")
    mixed = {0: _losses(2.0, 2.1), 1: _losses(2.0, 1.0), 2: _losses(2.0, math.nan)}
    assert markdown._divergence(summary, mixed).startswith("2 of 3 trials diverged: #0 (learning_rate 0.001), #2 (learning_rate 0.03)")
    calm = {0: _losses(2.0, 1.0), 1: _losses(2.0, 1.5), 2: {"history": [], "evaluations": []}}
    assert markdown._divergence(summary, calm).startswith("None of the 2 trials with a loss curve diverged")
    assert markdown._divergence(summary, {}) is None


def test_format_failures_of_the_best_trial_first_vs_best_evaluation():
    def evaluation(step, failures):
        return {"step": step, "examples_seen": step * 10, "status": "ok", "correct": 50, "format_failure": failures, "num_problems": 100}

    summary = {"best_trial": 0, "trials": [_row(0, 1e-3, accuracy_step=20, best_step=30)]}
    histories = {0: {"history": [], "evaluations": [evaluation(10, 40), evaluation(20, 5), evaluation(30, 8),
                                                    {"step": 40, "examples_seen": 400, "status": "error"}]}}
    assert markdown._format_failures(summary, histories) == (
        "Format failures fell from 40.0% to 5.0% of the graded problems in the best trial (#0), "
        "from its first evaluation (100 examples) to its best (200 examples).")
    never = {0: {"history": [], "evaluations": [evaluation(10, 0), evaluation(20, 0)]}}
    assert markdown._format_failures(summary, never) is None  # no format failure ever: nothing to tell
    histories[0]["evaluations"] = histories[0]["evaluations"][:1]
    assert markdown._format_failures(summary, histories) is None  # one evaluation: nothing to compare


def test_test_vs_validation_says_when_the_intervals_part():
    best = _row(0, 1e-3, accuracy=0.9, accuracy_ci=[0.85, 0.94], accuracy_n=200)
    test = {"trial": 0, "accuracy": 0.7, "ci": [0.66, 0.74], "n": 500, "stale": False}
    summary = {"best_trial": 0, "trials": [best], "test_accuracy": test}
    assert markdown._test_vs_validation(summary).endswith("test is below validation beyond both intervals.")
    summary["test_accuracy"] = {**test, "accuracy": 0.88, "ci": [0.85, 0.91]}
    assert markdown._test_vs_validation(summary).endswith("the intervals overlap.")
    summary["test_accuracy"] = {**test, "stale": True}
    assert markdown._test_vs_validation(summary) is None  # another trial's test says nothing of the best's


def test_stale_final_test_is_not_shown_as_the_best_trials(tmp_path):
    results = tmp_path / "results"
    study = simulated_study(None, results, n_trials=5)
    other = next(t.number for t in study.trials if t.number != study.best_trial.number)
    set_final_test(study, other)
    write_report(study, metric="eval/loss", n_trials=5, results_dir=results, plots=False, print_fn=lambda _: None)
    text = (results / "REPORT.md").read_text()
    assert "final test accuracy" not in text.split("## Final test")[0]
    section = text.split("## Final test")[1].split("\n## ")[0]
    test = study.user_attrs["final_test"]
    assert section.strip().startswith(f"The final test on record graded trial {other}: {test['accuracy']:.3f} [")
    assert f"That is not the best trial's result: trial {study.best_trial.number} is the best now." in section


def test_report_of_a_study_without_evaluator_or_rungs(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    study = optuna.create_study()
    for lr, value in ((1e-3, 0.5), (3e-3, 0.4)):
        study.add_trial(create_trial(params={"learning_rate": lr}, distributions={"learning_rate": FloatDistribution(1e-4, 1e-2, log=True)},
                                     value=value, user_attrs={"best_objective": value, "examples_seen": 800, "stopped_early": False}))
    write_report(study, metric="eval/loss", n_trials=2, results_dir=tmp_path, plots=False, print_fn=lambda _: None)
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Best trial: #1" in text and "## All trials" in text
    assert "## Tied with the best" not in text and "validation accuracy" not in text
    assert not re.search(r"\bNone\b(?! of the)", text)
    assert "- **First rung**: not computed: 0 trials reached the first rung; importance needs 4." in text


def test_accuracy_objective_picks_the_highest(tmp_path):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from lit_sft.stats import wilson_interval

    dists = {"learning_rate": FloatDistribution(1e-4, 1e-2, log=True), "batch_size": CategoricalDistribution([8, 16])}
    study = optuna.create_study(direction="maximize")
    for lr, bs, correct, state in ((1e-3, 8, 120, TrialState.COMPLETE), (3e-3, 8, 170, TrialState.COMPLETE),
                                   (2e-3, 16, 90, TrialState.PRUNED), (5e-3, 16, 60, TrialState.PRUNED)):
        accuracy = correct / 200
        study.add_trial(create_trial(state=state, params={"learning_rate": lr, "batch_size": bs}, distributions=dists,
                                     value=accuracy if state == TrialState.COMPLETE else None, intermediate_values={400: accuracy},
                                     user_attrs={"best_objective": accuracy, "accuracy": accuracy, "accuracy_n": 200,
                                                 "accuracy_ci": list(wilson_interval(correct, 200)), "pruned_at": 400}))
    summary = write_report(study, metric="eval/accuracy", n_trials=4, results_dir=tmp_path, plots=False, print_fn=lambda _: None)
    text = (tmp_path / "REPORT.md").read_text()
    assert summary["best_trial"] == 1 and "## Best trial: #1" in text
    assert "Objective: the highest `eval/accuracy`" in text
    table = text.split("## Best learning rate per batch size")[1].split("\n## ")[0]
    assert "| 8 | 2 | #1 | 0.003 |" in table and "| 16 | 2 | #2 | 0.002 |" in table
