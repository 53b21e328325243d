"""OptunaPruning: reports at step = examples seen, mid-epoch, and prunes without crashing the fit."""

from __future__ import annotations

import warnings

import optuna
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerStatus
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from callbacks.pruning import OptunaPruning

BATCH = 8
BATCHES_PER_EPOCH = 64
EVAL_EVERY = 8  # batches: 8 evaluations inside the single epoch


class Regression(LightningModule):
    """Linear regression that counts examples like SFTModule does."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.layer = torch.nn.Linear(4, 1)
        self.examples_seen = 0

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.examples_seen += len(x)
        return torch.nn.functional.mse_loss(self.layer(x), y)

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("eval/loss", torch.nn.functional.mse_loss(self.layer(x), y), batch_size=len(x))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loaders() -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    x = torch.randn(BATCH * BATCHES_PER_EPOCH + 64, 4, generator=gen)
    y = x @ w
    train = TensorDataset(x[:-64], y[:-64])
    val = TensorDataset(x[-64:], y[-64:])
    return DataLoader(train, batch_size=BATCH), DataLoader(val, batch_size=32)


def _fit(trial: optuna.trial.Trial, monitor: str = "eval/loss") -> tuple[Trainer, OptunaPruning]:
    pruning = OptunaPruning(trial, monitor=monitor)
    trainer = Trainer(
        max_epochs=1, val_check_interval=EVAL_EVERY, num_sanity_val_steps=2, callbacks=[pruning],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )
    train, val = _loaders()
    trainer.fit(Regression(trial.suggest_float("lr", 0.0, 0.2)), train, val)
    return trainer, pruning


def test_mid_epoch_reports_land_on_distinct_steps_and_asha_prunes(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(
        storage=storage, study_name="pruning", direction="minimize",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=EVAL_EVERY * BATCH, reduction_factor=2),
    )
    study.enqueue_trial({"lr": 0.1})  # learns: its loss falls at every evaluation
    study.enqueue_trial({"lr": 0.0})  # never learns: worse than trial 0 at the first rung
    runs: list[tuple[Trainer, OptunaPruning]] = []

    def objective(trial: optuna.trial.Trial) -> float:
        trainer, pruning = _fit(trial)
        runs.append((trainer, pruning))
        pruning.check_pruned()
        return min(v for _, v in pruning.reports)

    study.optimize(objective, n_trials=2)

    # Read back from the SQLite file, as a resumed study or another worker would.
    trials = optuna.load_study(study_name="pruning", storage=storage).trials
    expected_steps = [BATCH * EVAL_EVERY * k for k in range(1, BATCHES_PER_EPOCH // EVAL_EVERY + 1)]
    assert trials[0].state == optuna.trial.TrialState.COMPLETE
    assert sorted(trials[0].intermediate_values) == expected_steps  # 8 steps, none at the sanity check
    values = [trials[0].intermediate_values[s] for s in expected_steps]
    assert values[-1] < values[0]
    assert trials[0].value == pytest.approx(min(values))

    assert trials[1].state == optuna.trial.TrialState.PRUNED
    assert sorted(trials[1].intermediate_values) == [BATCH * EVAL_EVERY]
    trainer, pruning = runs[1]
    assert pruning.pruned_at == BATCH * EVAL_EVERY
    assert trainer.global_step == EVAL_EVERY  # stopped right after the first evaluation
    # A prune is a normal stop for Lightning (loggers and callbacks finish cleanly), not a crash.
    assert trainer.state.status == TrainerStatus.FINISHED
    assert runs[0][1].pruned_at is None


def test_missing_metric_warns_once_and_never_prunes(tmp_path):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
    )
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.0, 0.2)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, pruning = _fit(trial, monitor="eval/perplexity")
    missing = [w for w in caught if "eval/perplexity" in str(w.message)]
    assert len(missing) == 1
    assert "eval/loss" in str(missing[0].message)  # names what was logged instead
    assert pruning.reports == [] and not pruning.pruned
    assert trainer.global_step == BATCHES_PER_EPOCH
    pruning.check_pruned()  # does not raise


def _rung_study(min_resource: int = 64) -> optuna.Study:
    """A study whose first trial set a good value at the rung, so a worse one there is pruned."""
    study = optuna.create_study(pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=2))
    first = study.ask()
    first.report(0.1, min_resource)
    assert not first.should_prune()
    study.tell(first, 0.1)
    return study


def test_default_monitor_is_eval_loss() -> None:
    assert OptunaPruning(None).monitor == "eval/loss" and not OptunaPruning(None).late


def test_a_repeated_step_is_not_reported_twice(tmp_path) -> None:
    study = _rung_study()
    pruning = OptunaPruning(study.ask())
    assert pruning._report(64, 0.5) is True  # worse than the first trial at the rung
    assert pruning._report(64, 0.01) is False  # the same examples seen again: no second report
    assert pruning.reports == [(64, 0.5)]
    assert study.trials[1].intermediate_values == {64: 0.5}


def test_without_a_trial_nothing_is_reported() -> None:
    pruning = OptunaPruning(None)
    assert pruning._report(64, 0.5) is False and pruning.reports == []


def test_the_baseline_is_recorded_at_its_rung_but_never_stopped(tmp_path) -> None:
    study = _rung_study()
    trial = study.ask()
    assert OptunaPruning(trial, protected=True)._report(64, 0.5) is False
    attrs = study._storage.get_trial_system_attrs(trial._trial_id)
    assert attrs["completed_rung_0"] == 0.5  # competes at the rung for the trials after it


def test_a_report_at_the_full_length_is_never_a_prune(tmp_path) -> None:
    for full, expect in ((64, False), (65, True), (None, True)):
        study = _rung_study()
        assert OptunaPruning(study.ask(), full_examples=full)._report(64, 0.5) is expect, full


def test_stop_says_which_trial_where_and_the_value(monkeypatch) -> None:
    import callbacks.pruning

    said: list[str] = []
    monkeypatch.setattr(callbacks.pruning, "rank_zero_info", said.append)  # whatever logging earlier tests set up
    study = _rung_study()
    trial = study.ask()
    pruning = OptunaPruning(trial)
    pruning._report(32, 0.7)
    pruning._report(64, 0.5)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    pruning._stop(trainer, 64, 0.5)
    OptunaPruning(None)._stop(trainer, 96, float("nan"))
    assert trainer.should_stop and pruning.pruned and pruning.pruned_at == 64
    assert said == [f"trial {trial.number} pruned at 64 examples seen (eval/loss=0.5000)", "trial pruned at 96 examples seen (eval/loss=nan)"]
    with pytest.raises(optuna.TrialPruned, match=r"^pruned at 64 examples seen with eval/loss=0\.5$"):
        pruning.check_pruned()


def test_an_evaluation_that_failed_is_missing_even_with_a_figure(tmp_path) -> None:
    study = _rung_study()
    pruning = OptunaPruning(study.ask(), monitor="eval/accuracy")
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    pruning.on_evaluator_result(trainer, None, {"status": "error", "examples_seen": 64, "accuracy": 0.0})
    assert pruning.missing == [64] and pruning.reports == []


def test_examples_seen_is_written_at_each_evaluation_and_a_rankless_callback_runs(tmp_path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'seen.db'}")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(0.0, 0.2)})
    _fit(trial)
    assert study.trials[0].user_attrs["examples_seen"] == BATCH * BATCHES_PER_EPOCH
    # trial=None (the other ranks of a multi-process trial): fits without touching any study.
    pruning = OptunaPruning(None)
    trainer = Trainer(max_epochs=1, val_check_interval=EVAL_EVERY, callbacks=[pruning], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    train, val = _loaders()
    trainer.fit(Regression(0.1), train, val)
    assert pruning.reports == [] and trainer.global_step == BATCHES_PER_EPOCH
