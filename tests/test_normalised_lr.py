"""A learning rate searched normalised by batch size (search space `scale`): the sampler models the
normalised value, the trial trains with the applied one, and the report shows the applied one."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import yaml

from lit_sft.errors import UserError
from lit_sft.study import run
from tests.helpers import sqlite_url, study_cfg, wrap_train

SPACE = """\
learning_rate:
  kind: float
  low: 1.0e-3
  high: 1.0e-2
  log: true
  key: model.learning_rate
  scale: {with: batch_size, rule: sqrt, reference: 32}
batch_size: {kind: categorical, choices: [8, 16], key: data.batch_size}
"""


def _study(cfg) -> optuna.Study:
    return optuna.load_study(study_name=cfg["study"]["name"], storage=sqlite_url(Path(cfg["study"]["results_dir"])))


def test_trials_train_with_the_applied_value_and_the_report_shows_it(tiny_model_path, tmp_path, monkeypatch):
    cfg = study_cfg(tiny_model_path, tmp_path, SPACE, "normalised")
    Path(cfg["study"]["results_dir"]).mkdir(parents=True)
    queued = optuna.create_study(study_name="normalised", storage=sqlite_url(Path(cfg["study"]["results_dir"])))
    queued.enqueue_trial({"learning_rate": 4e-3, "batch_size": 8})
    queued.enqueue_trial({"learning_rate": 4e-3, "batch_size": 16})
    calls = wrap_train(monkeypatch, {})
    summary = run.tune(cfg)

    study = _study(cfg)
    by_number = {t.number: t for t in study.trials}
    for call in calls:
        trial = by_number[call["number"]]
        sampled, batch = trial.params["learning_rate"], trial.params["batch_size"]
        applied = sampled * math.sqrt(batch / 32)
        # Optuna holds what the sampler proposed; the run got the applied value.
        assert sampled == pytest.approx(4e-3)
        assert call["cfg"]["model"]["learning_rate"] == pytest.approx(applied)
        assert trial.user_attrs["applied_params"]["learning_rate"] == pytest.approx(applied)
        assert trial.user_attrs["param_scales"] == {"learning_rate": "learning_rate = sampled x sqrt(batch_size / 32)"}
    assert sorted(c["cfg"]["model"]["learning_rate"] for c in calls) == pytest.approx([2e-3, 4e-3 * math.sqrt(0.5)])

    results = yaml.safe_load((Path(cfg["study"]["results_dir"]) / "study_results.yaml").read_text())
    assert results["param_scales"] == {"learning_rate": "learning_rate = sampled x sqrt(batch_size / 32)"}
    rows = {r["number"]: r for r in results["trials"]}
    for number, trial in by_number.items():
        assert rows[number]["params"]["learning_rate"] == pytest.approx(trial.user_attrs["applied_params"]["learning_rate"])
        assert rows[number]["sampled_params"]["learning_rate"] == pytest.approx(trial.params["learning_rate"])
    assert results["best_params"]["learning_rate"] == pytest.approx(rows[results["best_trial"]]["params"]["learning_rate"])
    assert summary["best_params"] == results["best_params"]

    report = (Path(cfg["study"]["results_dir"]) / "REPORT.md").read_text()
    assert "searched normalised (`learning_rate = sampled x sqrt(batch_size / 32)`)" in report
    assert "learning_rate searched (normalised)" in report
    best_lr = f"{results['best_params']['learning_rate']:.3g}"
    assert best_lr in report.split("## Best trial")[1].split("##")[0]


def test_the_hyperparameter_plot_draws_the_applied_value_and_says_so(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_sft.study import plots

    rows = [{"number": n, "state": "COMPLETE", "value": v, "best_objective": v, "params": {"learning_rate": lr, "batch_size": bs}}
            for n, (lr, bs, v) in enumerate([(1e-3, 8, 0.5), (4e-3, 32, 0.4)])]
    summary = {"direction": "minimize", "metric": "eval/loss", "best_trial": 1,
               "param_scales": {"learning_rate": "learning_rate = sampled x sqrt(batch_size / 32)"}}
    drawn = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append((fig.axes[0].get_xlabel(), list(fig.axes[0].collections[0].get_offsets()[:, 0])))
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        assert plots._plot_hyperparams(plt, rows, summary, tmp_path / "h.png")
    finally:
        plt.Figure.savefig = real_savefig
    label, xs = drawn[0]
    assert label == "learning_rate (applied; searched as learning_rate = sampled x sqrt(batch_size / 32))"
    assert sorted(xs) == pytest.approx([1e-3, 4e-3])


def test_a_study_is_not_resumed_with_its_learning_rate_searched_another_way(tiny_model_path, tmp_path):
    cfg = study_cfg(tiny_model_path, tmp_path, SPACE, "switch", {"n_trials": 1})
    run.tune(cfg)
    plain = tmp_path / "plain.yaml"
    plain.write_text(SPACE.replace("  scale: {with: batch_size, rule: sqrt, reference: 32}\n", ""))
    cfg["study"] = {**cfg["study"], "search_space": str(plain), "n_trials": 2}
    with pytest.raises(UserError, match=r"study 'switch' was searched with learning_rate = sampled x sqrt\(batch_size / 32\), "
                                        r"but .*plain.yaml has no normalised entry; use another study.name"):
        run.tune(cfg)
    assert len(_study(cfg).trials) == 1
