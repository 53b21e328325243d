"""A study sized by its compute: the example budget over all trials, the baseline trial (the
config's own values, run in full), and evaluations at the first step at or past each rung."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from callbacks.pruning import OptunaPruning
from lit_sft import storage as storage_mod
from lit_sft.search_space import load_search_space
from lit_sft.study import budget
from lit_sft.study.build import default_min_resource
from lit_sft.training import train
from tests.helpers import small_cfg, sqlite_url
from tests.test_resume import _wait_for_mid_trial
from tests.test_workers import finish_workers, start_workers, tune_argv, tune_env

SPACE = """\
learning_rate: {kind: float, low: 1.0e-4, high: 5.0e-2, log: true, key: model.learning_rate}
batch_size: {kind: categorical, choices: [8, 16, 64], key: data.batch_size}
weight_decay: {kind: float, low: 0.0, high: 0.1, key: model.weight_decay}
"""


def _space(tmp_path: Path, text: str = SPACE):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_search_space(path)


# ---- rungs and the baseline point -------------------------------------------------------------------


def test_rungs_below_the_full_budget_only():
    assert budget.rungs(512, 3, 0, 4608) == [512, 1536]  # 4608 is the end of the trial, not a decision
    assert budget.rungs(512, 3, 1, 4608) == [1536]
    assert budget.first_rung(18432, 3) == 2048 and budget.first_rung(20000, 3) == 2223


def test_default_first_rung_is_a_ninth_of_the_trial_budget(tmp_path):
    cfg = {"budget": {"examples": 18432, "eval_every_examples": 2048}, "trainer": {}, "data": {"batch_size": 8}}
    assert default_min_resource(cfg, _space(tmp_path), 3) == 2048
    assert default_min_resource(cfg, _space(tmp_path), 4) == 1152  # R/16: rungs R/16, R/4, R
    without = {"budget": {"examples": None, "eval_every_examples": 2000}, "trainer": {}, "data": {"batch_size": 8}}
    assert default_min_resource(without, _space(tmp_path), 3) == 2000


def test_baseline_takes_the_config_values_and_the_nearest_in_the_space(tmp_path):
    space = _space(tmp_path)
    inside = {"model": {"learning_rate": 2e-3, "weight_decay": 0.01}, "data": {"batch_size": 16}}
    params, moved = budget.baseline_params(space, inside)
    assert params == {"learning_rate": 2e-3, "batch_size": 16, "weight_decay": 0.01} and moved == {}
    outside = {"model": {"learning_rate": 1.0, "weight_decay": -0.5}, "data": {"batch_size": 36}}
    params, moved = budget.baseline_params(space, outside)
    # 36 is nearer 16 on a linear axis, nearer 64 on the log axis batch sizes live on (x1.8 vs x2.25).
    assert params == {"learning_rate": 5e-2, "batch_size": 64, "weight_decay": 0.0}
    assert moved == {"learning_rate": [1.0, 5e-2], "batch_size": [36, 64], "weight_decay": [-0.5, 0.0]}


def test_baseline_of_a_normalised_entry_applies_the_config_value(tmp_path):
    space = _space(tmp_path, SPACE.replace("key: model.learning_rate}", "key: model.learning_rate, "
                                           "scale: {with: batch_size, rule: linear, reference: 8}}"))
    params, moved = budget.baseline_params(space, {"model": {"learning_rate": 4e-3, "weight_decay": 0.0}, "data": {"batch_size": 16}})
    assert params["learning_rate"] == pytest.approx(2e-3) and moved == {}
    assert space.applied(params)["learning_rate"] == pytest.approx(4e-3)


# ---- the budget count --------------------------------------------------------------------------------


def test_spent_counts_finished_and_running_trials_but_not_queued_ones():
    study = optuna.create_study()
    done = study.ask()
    done.set_user_attr("examples_seen", 4608)
    study.tell(done, 1.0)
    pruned = study.ask()
    pruned.report(2.0, 512)  # no attr (killed before it was written): its last report counts
    study.tell(pruned, state=TrialState.PRUNED)
    running = study.ask()
    running.set_user_attr("examples_seen", 1024)  # progress written at its last evaluation
    study.enqueue_trial({"x": 1.0})
    used = budget.spent(study.get_trials(deepcopy=False), 6000)
    assert used.examples == 4608 + 512 + 1024 and used.left == 0
    assert used.exhausted and "6,144 of 6,000 examples spent" in used.describe()
    assert not budget.spent(study.get_trials(deepcopy=False), None).exhausted


# ---- evaluations at the rungs and the protected baseline, in real Trainers -------------------------------


def test_every_batch_size_is_evaluated_at_the_first_step_at_or_past_each_rung(tiny_model_path, tmp_path):
    cfg = small_cfg(tiny_model_path, tmp_path, data={"batch_size": 64, "num_generated": 400},
                    budget={"examples": 4480, "eval_every_examples": 2048, "eval_at_examples": [1000, 4000]},
                    trainer={"max_steps": 1000, "val_check_interval": 1000})
    result = train(cfg)
    evaluated = [r["examples_seen"] for r in result["history"] if "eval/loss" in r]
    # Regular evaluations at 2048 and 4096; at the rungs, steps 16 (1024 >= 1000) and 63 (4032 >= 4000).
    assert evaluated == [1024, 2048, 4032, 4096]


class _PruneAll(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_a_protected_trial_reports_but_is_never_pruned_and_no_trial_is_pruned_at_its_end(tiny_model_path, tmp_path):
    study = optuna.create_study(pruner=_PruneAll())
    cfg = small_cfg(tiny_model_path, tmp_path, trainer={"max_steps": 6, "val_check_interval": 2})
    protected = OptunaPruning(study.ask(), protected=True, full_examples=48)
    train(cfg, callbacks=[protected])
    assert not protected.pruned and [s for s, _ in protected.reports] == [16, 32, 48]
    plain = OptunaPruning(study.ask(), full_examples=16)
    train(small_cfg(tiny_model_path, tmp_path / "b", trainer={"max_steps": 2, "val_check_interval": 2}), callbacks=[plain])
    assert not plain.pruned  # its only report is at its full length: the trial is done, not pruned
    pruned = OptunaPruning(study.ask(), full_examples=48)
    train(small_cfg(tiny_model_path, tmp_path / "c", trainer={"max_steps": 6, "val_check_interval": 2}), callbacks=[pruned])
    assert pruned.pruned_at == 16


# ---- tune.py with a budget: one worker, rerun, two workers, kill -9 ---------------------------------------

R = 96  # examples per trial: 12 steps at batch 8, 6 at 16
BUDGET = 700


def _budget_argv(model_path: str, results: Path, name: str, *extra: str) -> list[str]:
    argv = tune_argv(model_path, results, name, "--study.n_trials", "null", "--budget.total_examples", str(BUDGET),
                     "--budget.examples", str(R), "--budget.eval_every_examples", "16", "--study.pruner.enabled", "true",
                     "--study.pruner.min_resource", "null", "--study.pruner.tolerance", "0", "--model.learning_rate", "3e-3",
                     "--data.batch_size", "16", *extra)
    return argv


def _trials(results: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=sqlite_url(results)).trials


def _spent(trials) -> int:
    return budget.spent(trials, None).examples


@pytest.mark.slow
def test_a_budgeted_study_trains_its_budget_starts_with_the_config_and_reruns_as_nothing(tiny_model_path, tmp_path):
    results = tmp_path / "results"
    argv = _budget_argv(tiny_model_path, results, "budget")
    out = subprocess.run(argv, cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trials = _trials(results, "budget")
    assert BUDGET <= _spent(trials) < BUDGET + R
    assert len(trials) > 5 and any(t.state == TrialState.PRUNED for t in trials)
    first = min(trials, key=lambda t: t.number)
    assert first.params == {"learning_rate": 3e-3, "batch_size": 16, "weight_decay": 0.0}
    assert first.user_attrs["baseline"] and first.state == TrialState.COMPLETE and first.user_attrs["examples_seen"] == R
    assert "budget: 0 of 700 examples spent (700 left)" in out.stdout
    data = yaml.safe_load((results / "study_results.yaml").read_text())
    assert data["budget"] == {"total_examples": BUDGET, "spent_examples": _spent(trials), "left_examples": 0}
    assert data["baseline"]["trial"] == 0 and data["baseline"]["params"]["learning_rate"] == 3e-3
    report = (results / "REPORT.md").read_text()
    assert f"{_spent(trials):,} of 700 examples spent" in report and "## Against your config" in report

    again = subprocess.run(argv, cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "nothing left to run (budget.total_examples spent" in again.stdout
    assert len(_trials(results, "budget")) == len(trials)


@pytest.mark.slow
def test_two_workers_share_one_budget(tiny_model_path, tmp_path):
    results = tmp_path / "results"
    argvs = [_budget_argv(tiny_model_path, results, "shared") for _ in range(2)]
    outputs = finish_workers(start_workers(argvs, tmp_path), tmp_path, timeout_s=600)
    trials = _trials(results, "shared")
    # Each worker starts a trial only while the shared count is short; both may be running at the end.
    assert BUDGET <= _spent(trials) < BUDGET + 2 * R
    assert sum(t.user_attrs.get("baseline", False) for t in trials) == 1
    assert len({t.user_attrs[storage_mod.WORKER_ATTR]["pid"] for t in trials}) == 2, outputs


@pytest.mark.slow
def test_kill_9_then_the_same_command_continues_the_same_budget(tiny_model_path, tmp_path):
    results = tmp_path / "results"
    argv = _budget_argv(tiny_model_path, results, "killed", "--study.pruner.enabled", "false", "--budget.examples", "480")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=tune_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = _wait_for_mid_trial(sqlite_url(results), "killed", proc, timeout_s=300)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    before = _spent(_trials(results, "killed"))
    assert 0 < before < BUDGET
    rerun = subprocess.run(argv, cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    trials = _trials(results, "killed")
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == TrialState.FAIL
    # The killed trial's progress was spent and stays counted; the rerun only tops the budget up.
    assert BUDGET <= _spent(trials) < BUDGET + 480
    assert f"{before:,} of 700 examples spent" in rerun.stdout
