"""The study end to end: real Optuna on a SQLite file, real Lightning on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from optuna.trial import TrialState

import tune as tune_cli
from lit_sft import training, weights
from lit_sft.study import run
from lit_sft.study.report import format_value
from lit_sft.cli import run_cli
from lit_sft.errors import UserError
from tests.helpers import RaiseAtSecondBatch, sqlite_url, study_cfg, tune_interrupted, wrap_train

ROOT = Path(__file__).resolve().parents[1]
SPACE = """\
learning_rate: {kind: float, low: 1.0e-4, high: 5.0e-2, log: true, key: model.learning_rate}
batch_size: {kind: categorical, choices: [8, 16], key: data.batch_size}
weight_decay: {kind: float, low: 0.0, high: 0.1, key: model.weight_decay}
"""
GOOD = {"learning_rate": 3e-2, "batch_size": 8, "weight_decay": 0.0}
SLOW = {"learning_rate": 1e-4, "batch_size": 8, "weight_decay": 0.0}


def _cfg(model_path: str, tmp_path: Path, study: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
    return study_cfg(model_path, tmp_path, SPACE, "test", study, **sections)


def _load(cfg: dict[str, Any]) -> optuna.Study:
    return optuna.load_study(study_name=cfg["study"]["name"], storage=sqlite_url(Path(cfg["study"]["results_dir"])))


def _enqueue(cfg: dict[str, Any], *params: dict[str, Any]) -> None:
    Path(cfg["study"]["results_dir"]).mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=cfg["study"]["name"], storage=sqlite_url(Path(cfg["study"]["results_dir"])))
    for p in params:
        study.enqueue_trial(p)


# ---- a whole study ----------------------------------------------------------------------------


@pytest.mark.slow
def test_small_study_end_to_end(tiny_model_path, tmp_path, monkeypatch, capsys):
    from lit_sft.evaluator import client as client_module

    clients = []

    class CountingClient(client_module.EvaluatorClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clients.append(self)

    monkeypatch.setattr(client_module, "EvaluatorClient", CountingClient)
    loggers = []
    real_make_logger = training.make_logger
    monkeypatch.setattr(training, "make_logger", lambda *a: loggers.append(a) or real_make_logger(*a))
    cfg = _cfg(
        tiny_model_path, tmp_path,
        study={"n_trials": 3, "name": "e2e", "plots": True, "save_best_model": True,
               "pruner": {"enabled": True, "reduction_factor": 2}},  # min_resource = 2 steps x batch 16 = 32
        evaluator={"enabled": True, "num_problems": 8, "max_new_tokens": 8, "batch_size": 8, "final_wait_s": 120},
        wandb={"enabled": True, "mode": "offline", "save_dir": str(tmp_path / "wandb")},
    )
    cfg["trainer"]["log_every_n_steps"] = 1
    _enqueue(cfg, GOOD, SLOW)  # trial 1 learns so little that ASHA stops it at its first rung

    summary = run.tune(cfg)

    trials = _load(cfg).trials
    assert [t.state for t in trials[:2]] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert len(trials) == 3 and trials[2].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # Mid-epoch evaluations land on distinct steps: examples seen.
    assert sorted(trials[0].intermediate_values) == [16, 32, 48]
    assert sorted(trials[1].intermediate_values) == [16, 32]
    assert trials[1].user_attrs["pruned_at"] == 32 and trials[1].user_attrs["global_step"] == 4
    # A trial's value is its best evaluation, not its last.
    assert trials[0].value == pytest.approx(min(trials[0].intermediate_values.values()))
    assert trials[0].user_attrs["best_examples_seen"] in (16, 32, 48)
    # One evaluator for the study, its grades stored on every trial; one more after it for the
    # final test, on the saved best model.
    assert len(clients) == 2 and clients[1].model_path == str(tmp_path / "results" / "best_model")
    for t in trials:
        cats = t.user_attrs["categories"]
        assert set(cats) == {"correct", "wrong_answer", "format_failure"} and sum(cats.values()) == 8
        assert 0.0 <= t.user_attrs["accuracy"] <= 1.0
    # W&B: one offline run per trial, grouped by study, params as config.
    assert [(wcfg["group"], name) for wcfg, name, _ in loggers] == [("e2e", f"trial-{i:04d}") for i in range(3)]
    assert loggers[0][2]["params"]["learning_rate"] == GOOD["learning_rate"] and loggers[0][2]["trial"] == 0
    assert loggers[0][2]["model"]["learning_rate"] == GOOD["learning_rate"]  # the config that ran
    runs = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 3

    results = tmp_path / "results"
    data = yaml.safe_load((results / "study_results.yaml").read_text())
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert data["best_trial"] == best.number and data["best_value"] == pytest.approx(best.value)
    assert data["best_params"] == best.params and set(best.params) == {"learning_rate", "batch_size", "weight_decay"}
    row = data["trials"][0]
    for key in ("number", "state", "params", "value", "accuracy", "categories", "best_step", "best_examples_seen"):
        assert key in row
    assert data["trials"][1]["state"] == "PRUNED" and data["trials"][1]["pruned_at"] == 32
    assert set(summary["plots"]) == {
        "training_loss.png", "eval_accuracy.png", "hyperparam_comparison.png", "categorization.png",
        "optimization_history.png", "intermediate_values.png", "param_importances.png",
    } - set(summary["plots_skipped"])
    assert {"training_loss.png", "eval_accuracy.png", "hyperparam_comparison.png", "categorization.png"} <= set(summary["plots"])
    for path in summary["plots"].values():
        assert Path(path).stat().st_size > 10_000

    # The best trial's best weights, loadable on their own.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = yaml.safe_load((results / "best_model" / "lit_sft_trial.json").read_text())
    assert (saved["study"], saved["trial"]) == ("e2e", best.number)
    assert data["best_model"] == str(results / "best_model")
    AutoModelForCausalLM.from_pretrained(results / "best_model")
    AutoTokenizer.from_pretrained(results / "best_model")

    out = capsys.readouterr().out
    assert "[1/3] trial 0 start: learning_rate=0.03 batch_size=8" in out
    assert "[2/3] trial 1 pruned at 32 examples" in out
    assert f"best: trial {best.number} eval/loss={format_value(best.value)}" in out  # the closing summary


# ---- model reuse ------------------------------------------------------------------------------


class Snapshots(Callback):
    """Weights at the start and end of a fit, and the optimizer's state at the start."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}
        self.optimizer_state_at_start: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = weights.snapshot(pl_module.model)
        self.optimizer_state_at_start = len(trainer.optimizers[0].state)

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = weights.snapshot(pl_module.model)


def test_every_trial_starts_from_the_initial_weights_of_one_load(tiny_model_path, tmp_path, monkeypatch):
    weights.clear_cache()
    loads = []
    real_load = weights._from_pretrained
    monkeypatch.setattr(weights, "_from_pretrained", lambda *a: loads.append(a) or real_load(*a))
    snaps = {0: Snapshots(), 1: Snapshots()}
    calls = wrap_train(monkeypatch, {n: [s] for n, s in snaps.items()})
    cfg = _cfg(tiny_model_path, tmp_path)
    _enqueue(cfg, GOOD, SLOW)

    run.tune(cfg)

    from transformers import AutoModelForCausalLM

    pristine = weights.snapshot(AutoModelForCausalLM.from_pretrained(tiny_model_path))
    assert len(calls) == 2 and len(loads) == 1  # one load for the whole study
    first, second = snaps[0], snaps[1]
    assert all(torch.equal(first.start[k], pristine[k]) for k in pristine)
    assert any(not torch.equal(first.end[k], pristine[k]) for k in pristine)  # trial 0 trained
    # Trial 1 starts from exactly the loaded weights, not from where trial 0 ended...
    assert all(torch.equal(second.start[k], pristine[k]) for k in pristine)
    # ...and with a fresh optimizer.
    assert first.optimizer_state_at_start == 0 and second.optimizer_state_at_start == 0
    weights.clear_cache()


# ---- failures ---------------------------------------------------------------------------------




def test_failures_are_recorded_and_the_study_goes_on(tiny_model_path, tmp_path, monkeypatch, capsys):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    wrap_train(monkeypatch, {0: [RaiseAtSecondBatch(RuntimeError("boom"))], 1: [RaiseAtSecondBatch(oom)]})
    freed = []
    monkeypatch.setattr(run.gc, "collect", lambda *a: freed.append(1) or 0)
    cfg = _cfg(tiny_model_path, tmp_path, study={"n_trials": 3})

    summary = run.tune(cfg)

    trials = _load(cfg).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["reason"] == "exception" and trials[0].user_attrs["error"] == "RuntimeError: boom"
    assert trials[1].user_attrs["reason"] == "oom" and "CUDA out of memory" in trials[1].user_attrs["error"]
    assert "boom" in Path(trials[0].user_attrs["traceback_file"]).read_text()
    assert len(freed) >= 3  # memory released after each trial, before the next one
    assert [(f["number"], f["reason"]) for f in summary["failures"]] == [(0, "exception"), (1, "oom")]
    assert summary["counts"] == {"complete": 1, "fail": 2}
    out = capsys.readouterr().out
    assert "[1/3] trial 0 fail (exception): RuntimeError: boom" in out
    assert "failed: trial 1 (oom)" in out


def test_a_user_error_stops_the_study_at_once(tiny_model_path, tmp_path, monkeypatch):
    bad = UserError("data.batch_size=16 is larger than the 12 training records")
    wrap_train(monkeypatch, {0: [RaiseAtSecondBatch(bad)]})
    cfg = _cfg(tiny_model_path, tmp_path, study={"n_trials": 5})
    with pytest.raises(UserError, match="larger than"):
        run.tune(cfg)
    trials = _load(cfg).trials
    assert len(trials) == 1
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs["reason"] == "config"


def test_ctrl_c_in_a_trial_fails_it_and_writes_the_report(tiny_model_path, tmp_path, monkeypatch):
    wrap_train(monkeypatch, {1: [RaiseAtSecondBatch(KeyboardInterrupt())]})
    cfg = _cfg(tiny_model_path, tmp_path, study={"n_trials": 3})
    # Lightning shuts the fit down and calls sys.exit(1); the study must still end cleanly.
    tune_interrupted(cfg)
    trials = _load(cfg).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]  # none left RUNNING
    assert trials[1].user_attrs["reason"] == "interrupted"
    data = yaml.safe_load((tmp_path / "results" / "study_results.yaml").read_text())
    assert data["counts"] == {"complete": 1, "fail": 1}


# ---- CLI: config file, overrides, resume, errors ----------------------------------------------


def _argv(tiny_model_path: str, tmp_path: Path, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return [
        "--config", str(ROOT / "configs" / "tune.yaml"),
        "--model.model_name_or_path", tiny_model_path,
        "--data.num_generated", "160", "--data.eval_size", "16", "--data.num_validation_problems", "8", "--data.max_length", "128",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--budget.examples", "null", "--budget.eval_every_examples", "null",  # else they set the steps
        "--evaluator.enabled", "false", "--wandb.enabled", "false",
        "--study.name", "cli", "--study.results_dir", str(tmp_path / "results"), "--study.search_space", str(space),
        "--study.plots", "false", "--study.save_best_model", "false", "--study.heartbeat_interval_s", "null",
        *extra,
    ]


def test_cli_overrides_take_effect_and_a_rerun_resumes(tiny_model_path, tmp_path):
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.n_trials", "2")) == 0
    storage = sqlite_url(tmp_path / "results")
    trials = optuna.load_study(study_name="cli", storage=storage).trials
    assert len(trials) == 2
    assert all(t.user_attrs["global_step"] <= 4 for t in trials)  # --trainer.max_steps 4
    assert all(t.params["batch_size"] in (8, 16) for t in trials)  # --study.search_space

    # n_trials is the study's total: raising it to 3 runs one more trial, with new parameters.
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.n_trials", "3")) == 0
    trials = optuna.load_study(study_name="cli", storage=storage).trials
    assert len(trials) == 3
    assert trials[2].params["learning_rate"] not in {t.params["learning_rate"] for t in trials[:2]}
    # Nothing left to do: no new trial.
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.n_trials", "3")) == 0
    assert len(optuna.load_study(study_name="cli", storage=storage).trials) == 3


def test_without_config_the_embedded_default_is_used(monkeypatch):
    seen = []
    monkeypatch.setattr(run, "tune", lambda cfg: seen.append(cfg) or {"study": "tiny-math", "counts": {"complete": 5}})
    assert tune_cli.main(["--study.n_trials", "5"]) == 0
    study = seen[0]["study"]
    assert study["n_trials"] == 5 and study["search_space"] == "configs/search_space_tiny.yaml"
    assert seen[0]["model"]["model_name_or_path"] is None  # the embedded tiny model


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--study.n_trials", "0"], "study.n_trials must be >= 1"),
        (["--study.search_space", "/nonexistent/space.yaml"], "study.search_space: no such file: /nonexistent/space.yaml"),
        (["--study.direction", "sideways"], "study.direction"),
    ],
)
def test_bad_study_config_is_one_error_line_and_exit_2(tiny_model_path, tmp_path, capsys, extra, needle):
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_bad_search_space_names_file_and_entries(tiny_model_path, tmp_path, capsys):
    argv = _argv(tiny_model_path, tmp_path)
    (tmp_path / "space.yaml").write_text(SPACE)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: {kind: float, low: 0.0, high: 1.0e-2, log: true, key: model.learning_rate}\n"
                   "warmup: {kind: float, low: 0.0, high: 0.1, key: model.warmup_steps}\n")
    argv[argv.index("--study.search_space") + 1] = str(bad)
    assert run_cli(tune_cli.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: search space {bad}: 2 problems")
    assert "line 1, learning_rate: log scale needs low > 0" in err and "line 2, warmup: key 'model.warmup_steps'" in err


class Hog(Callback):
    """Holds 1 GiB in a frame that the OOM's traceback keeps alive, then runs out of memory."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            held = torch.empty(2**30, dtype=torch.uint8, device=pl_module.device)  # noqa: F841
            torch.empty(2**50, dtype=torch.uint8, device=pl_module.device)  # 1 PiB: a real CUDA OOM


class MemoryAtStart(Callback):
    def __init__(self) -> None:
        self.allocated: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.allocated = torch.cuda.memory_allocated()


@pytest.mark.gpu
def test_cuda_oom_fails_the_trial_and_frees_its_memory_for_the_next(tiny_model_path, tmp_path, monkeypatch):
    at_start = MemoryAtStart()
    wrap_train(monkeypatch, {0: [Hog()], 1: [at_start]})
    cfg = _cfg(tiny_model_path, tmp_path)
    cfg["trainer"].update(accelerator="gpu", devices=1)
    run.tune(cfg)
    trials = _load(cfg).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["reason"] == "oom" and "OutOfMemoryError" in trials[0].user_attrs["error"]
    assert at_start.allocated is not None and at_start.allocated < 2**28  # the GiB held by trial 0 is gone
    weights.clear_cache()
