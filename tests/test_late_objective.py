"""An objective the evaluator returns later (eval/accuracy): reported at its own checkpoint,
pruning, early stopping and the best model driven by results as they arrive; a missing result is
missing, never a zero. Real train() runs on the tiny model, a real evaluator process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from lightning.pytorch import Callback
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from callbacks.pruning import OptunaPruning
from lit_sft.evaluator import EvaluatorClient, EvaluatorConfig
from lit_sft.formats import Problem, r1_zero_prompt
from lit_sft.synthetic import make_problems
from lit_sft.training import train
from lit_sft.weights import snapshot
from tests.helpers import small_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOAD_TIMEOUT_S = 180.0
BATCH = 8


class HeldBackClient:
    """The real evaluator client, whose results the poster only sees `hold` polls after they
    came in: a slow evaluator, made deterministic, so a result lands steps after its checkpoint."""

    def __init__(self, client: EvaluatorClient, hold: int) -> None:
        self.client, self.hold = client, hold
        self.held: list[list[Any]] = []
        self.posted_at: dict[int, int] = {}

    def start(self) -> None:
        self.client.start()

    def post(self, run: str, step: int, examples_seen: int, path: str) -> int:
        job = self.client.post(run, step, examples_seen, path)
        self.posted_at[job] = step
        return job

    def poll(self) -> list[dict[str, Any]]:
        self.held += [[result, 0] for result in self.client.poll()]
        for entry in self.held:
            entry[1] += 1
        out = [r for r, age in self.held if age > self.hold]
        self.held = [e for e in self.held if e[1] <= self.hold]
        return out

    def wait(self, timeout_s: float, jobs: list[int] | None = None) -> list[dict[str, Any]]:
        out, self.held = [r for r, _ in self.held], []
        return out + self.client.wait(timeout_s, jobs=jobs)

    def cancel(self, jobs: list[int]) -> None:
        self.client.cancel(jobs)


class Snapshots(Callback):
    """The weights at every validation, by step: what each posted checkpoint held."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        self.by_step[trainer.global_step] = snapshot(pl_module.model)


class TruncateSecondCheckpoint(HeldBackClient):
    """Cuts the second posted weights file in half before the evaluator sees it: a failed evaluation."""

    def __init__(self, client: EvaluatorClient) -> None:
        super().__init__(client, hold=0)

    def post(self, run: str, step: int, examples_seen: int, path: str) -> int:
        if len(self.posted_at) == 1:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
        return super().post(run, step, examples_seen, path)


@pytest.fixture(scope="module")
def client(tiny_model_path: str):
    problems = [Problem(r1_zero_prompt(p["problem"]), p["answer"]) for p in make_problems(8, seed=1)]
    config = EvaluatorConfig(device="cpu", num_problems=8, max_new_tokens=8, batch_size=8, num_examples=0)
    with EvaluatorClient(tiny_model_path, problems, config) as started:
        assert started.wait_ready(LOAD_TIMEOUT_S)
        yield started


def _cfg(model_path: str, tmp_path: Path, steps: int, patience: int = 100) -> dict[str, Any]:
    return small_cfg(
        model_path, tmp_path,
        trainer={"max_steps": steps, "val_check_interval": 2},
        data={"batch_size": BATCH},
        early_stopping={"monitor": "eval/accuracy", "mode": "max", "patience": patience, "min_delta": 0.0},
        evaluator={"enabled": True, "final_wait_s": LOAD_TIMEOUT_S},
    )


def _study_with_a_strong_first_trial(tmp_path: Path) -> optuna.Study:
    """A maximizing study whose earlier trial reached accuracy 1.0 at the first rung (16 examples)."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize",
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=2 * BATCH, reduction_factor=2),
    )
    study.add_trial(create_trial(
        params={"lr": 1e-3}, distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)}, value=1.0,
        intermediate_values={2 * BATCH: 1.0, 4 * BATCH: 1.0}, system_attrs={"completed_rung_0": 1.0},
    ))
    return study


def test_a_late_result_is_reported_at_its_checkpoint_and_prunes_at_the_next_step(client, tiny_model_path, tmp_path):
    study = _study_with_a_strong_first_trial(tmp_path)
    trial = study.ask({"lr": FloatDistribution(1e-4, 1e-2, log=True)})
    pruning = OptunaPruning(trial, monitor="eval/accuracy")
    held = HeldBackClient(client, hold=3)
    result = train(_cfg(tiny_model_path, tmp_path, steps=40), callbacks=[pruning], evaluator=held, run_name="late")
    # The untrained model answers nothing right: 0.0 at the first rung, where the other trial had 1.0.
    first = result["evaluations"][0]
    assert first["status"] == "ok" and first["accuracy"] == 0.0 and first["examples_seen"] == 2 * BATCH
    frozen = study.trials[1]
    assert frozen.intermediate_values == {2 * BATCH: 0.0}  # at its own checkpoint's examples seen
    assert pruning.pruned_at == 2 * BATCH
    # It arrived steps after its checkpoint (later checkpoints were posted meanwhile), and the
    # fit stopped at the step boundary where it arrived, not at a later validation.
    arrived = result["poster_received_at_step"][first["job"]]
    assert arrived > first["step"] + 2
    assert result["global_step"] == arrived < 40
    with pytest.raises(optuna.TrialPruned):
        pruning.check_pruned()


def test_early_stopping_counts_results_and_the_best_model_is_the_checkpoint_that_earned_it(client, tiny_model_path, tmp_path):
    snapshots = Snapshots()
    held = HeldBackClient(client, hold=1)
    result = train(_cfg(tiny_model_path, tmp_path, steps=60, patience=2), callbacks=[snapshots], evaluator=held,
                   run_name="stop", keep_best_weights=True)
    graded = [e for e in result["evaluations"] if e["status"] == "ok"]
    accuracies = [e["accuracy"] for e in graded]
    # Patience 2: stopped after the second result that did not beat the best so far.
    best_so_far, waits = None, 0
    for i, value in enumerate(accuracies):
        if best_so_far is None or value > best_so_far:
            best_so_far, waits = value, 0
        else:
            waits += 1
        if waits == 2:
            stop_index = i
            break
    else:
        pytest.fail(f"no two results in a row without improvement: {accuracies}")
    assert result["stopped_early"] and result["global_step"] < 60
    assert result["poster_received_at_step"][graded[stop_index]["job"]] == result["global_step"]
    # The trial's value is its best accuracy, and the best state is that checkpoint's weights.
    best = next(e for e in graded if e["accuracy"] == max(accuracies))
    assert result["objective"] == max(accuracies) and result["best_step"] == best["step"]
    expected = snapshots.by_step[best["step"]]
    assert all(torch.equal(result["best_state"][k], expected[k]) for k in expected)
    # Every weights file is gone: graded ones at once, the kept best once read back.
    assert not list(Path(tmp_path, "out", "weights").rglob("*.safetensors"))


def test_a_failed_evaluation_is_missing_never_zero(client, tiny_model_path, tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    trial = study.ask({"lr": FloatDistribution(1e-4, 1e-2, log=True)})
    pruning = OptunaPruning(trial, monitor="eval/accuracy")
    faulty = TruncateSecondCheckpoint(client)
    result = train(_cfg(tiny_model_path, tmp_path, steps=6), callbacks=[pruning], evaluator=faulty, run_name="miss")
    statuses = {e["examples_seen"]: e["status"] for e in result["evaluations"]}
    assert statuses == {16: "ok", 32: "error", 48: "ok"}
    assert pruning.missing == [32]
    assert sorted(study.trials[0].intermediate_values) == [16, 48]  # nothing reported for 32
    assert result["objective"] == max(e["accuracy"] for e in result["evaluations"] if e["status"] == "ok")


def test_an_evaluator_metric_needs_the_evaluator(tiny_model_path, tmp_path):
    from lit_sft.errors import UserError

    cfg = _cfg(tiny_model_path, tmp_path, steps=4)
    cfg["evaluator"]["enabled"] = False
    with pytest.raises(UserError, match="early_stopping.monitor: eval/accuracy comes from the evaluator"):
        train(cfg)


def test_eval_loss_objective_is_unchanged(tiny_model_path, tmp_path):
    """With eval/loss, values are read at validation end as before: no results involved."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}")
    trial = study.ask({"lr": FloatDistribution(1e-4, 1e-2, log=True)})
    pruning = OptunaPruning(trial, monitor="eval/loss")
    result = train(small_cfg(tiny_model_path, tmp_path, trainer={"max_steps": 4, "val_check_interval": 2}), callbacks=[pruning])
    assert sorted(study.trials[0].intermediate_values) == [16, 32]
    assert study.trials[0].state == TrialState.RUNNING and result["objective"] == min(v for _, v in pruning.reports)
