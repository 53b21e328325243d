"""CheckpointPoster with real Lightning Trainers on the tiny model and a real evaluator process."""

from __future__ import annotations

import csv
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from callbacks.checkpoint_poster import CheckpointPoster
from lit_sft.evaluator import EvaluatorClient, EvaluatorConfig, EvaluatorWarning
from lit_sft.formats import Problem

PROBLEMS = [Problem(f"Question: what is {i} plus {i}? Assistant: <think>", str(2 * i)) for i in range(8)]
LOAD_TIMEOUT_S = 180.0
EVAL_KEYS = ["eval/accuracy", "eval/format_accuracy", "eval/correct", "eval/wrong_answer", "eval/format_failure", "eval/mean_response_length"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyLM(LightningModule):
    """The tiny HF causal LM trained on random tokens: what the poster sees of an SFT module."""

    def __init__(self, model_path: str) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path)
        self.examples_seen = 0

    def _loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    @override
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.examples_seen += len(batch[0])
        return self._loss(batch)

    @override
    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("eval/loss", self._loss(batch))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loaders(vocab_size: int) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (64, 16), generator=generator)
    data = TensorDataset(tokens)
    return DataLoader(data, batch_size=4, shuffle=True), DataLoader(data, batch_size=4)


class StopWhen(Callback):
    """Stops training once `condition(poster)` holds, so a test does not depend on machine speed."""

    def __init__(self, poster: CheckpointPoster, condition) -> None:
        self.poster = poster
        self.condition = condition

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.condition(self.poster):
            trainer.should_stop = True


class KillEvaluatorAfterFirstPost(Callback):
    """SIGKILLs the evaluator right after the poster posted its first checkpoint."""

    def __init__(self, client: EvaluatorClient) -> None:
        self.client = client
        self.killed: tuple[int, int] | None = None
        """(pid, step) of the kill."""

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.killed is None and not trainer.sanity_checking:
            pid = self.client.pid
            os.kill(pid, signal.SIGKILL)
            self.killed = (pid, trainer.global_step)


def fit(
    model_path: str, tmp_path: Path, poster: CheckpointPoster, *extra: Callback, max_steps: int, every: int, accelerator: str = "cpu"
) -> tuple[Trainer, list[dict[str, str]]]:
    """Train TinyLM with the poster and a CSV logger; returns the trainer and the logged rows."""
    module = TinyLM(model_path)
    train, val = loaders(module.model.config.vocab_size)
    logger = CSVLogger(tmp_path / "logs", name="run")
    trainer = Trainer(
        max_steps=max_steps, max_epochs=-1, val_check_interval=every, check_val_every_n_epoch=None,
        limit_val_batches=1, num_sanity_val_steps=1, logger=logger, callbacks=[poster, *extra],
        accelerator=accelerator, devices=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train, val)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return trainer, rows


def eval_rows(rows: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    """Logged eval/* figures by step."""
    return {int(r["step"]): {k: float(r[k]) for k in EVAL_KEYS} for r in rows if r.get("eval/accuracy")}


@pytest.fixture(scope="module")
def client(tiny_model_path: str):
    config = EvaluatorConfig(device="cpu", num_problems=8, max_new_tokens=16, batch_size=8, num_examples=2)
    with EvaluatorClient(tiny_model_path, PROBLEMS, config) as started:
        assert started.wait_ready(LOAD_TIMEOUT_S)
        yield started


def test_results_are_logged_at_their_step_while_training_goes_on(client: EvaluatorClient, tiny_model_path: str, tmp_path: Path) -> None:
    poster = CheckpointPoster(client, "trial-0", tmp_path / "weights" / "trial-0", final_wait_s=LOAD_TIMEOUT_S)
    # Train until two results were picked up mid-training (bounded by max_steps).
    stopper = StopWhen(poster, lambda p: len(p.results) >= 2)
    trainer, rows = fit(tiny_model_path, tmp_path, poster, stopper, max_steps=2000, every=10)
    assert trainer.global_step < 2000, "no evaluation result came back during training"
    assert client.pid != os.getpid()
    steps = [r["step"] for r in poster.results]
    # Every 10 steps, plus the validation Lightning runs when a callback stops training; none
    # for the sanity check at step 0.
    assert steps[:2] == [10, 20] and steps == sorted(set(steps)) and 0 not in steps
    assert all(s % 10 == 0 for s in steps[:-1]) and steps[-1] == trainer.global_step
    assert all(r["status"] == "ok" and r["run"] == "trial-0" for r in poster.results)
    assert [r["examples_seen"] for r in poster.results] == [4 * s for s in steps]
    # The loop never waited: results came back steps after their post, picked up mid-training.
    early = poster.results[:2]
    assert all(r["step"] < poster.received_at_step[r["job"]] for r in early)
    assert all(poster.received_at_step[r["job"]] <= trainer.global_step for r in early)
    logged = eval_rows(rows)
    assert sorted(logged) == steps
    for result in poster.results:
        assert logged[result["step"]]["eval/accuracy"] == pytest.approx(result["accuracy"])
        assert logged[result["step"]]["eval/format_failure"] == result["format_failure"]
    # The weights were written, read by the evaluator, then deleted with their folder.
    assert not (tmp_path / "weights" / "trial-0").exists()
    assert client.outstanding == []


def test_final_wait_is_bounded_and_late_results_are_missing_not_zero(client: EvaluatorClient, tiny_model_path: str, tmp_path: Path) -> None:
    poster = CheckpointPoster(client, "trial-1", tmp_path / "weights", final_wait_s=0.0)
    with pytest.warns(EvaluatorWarning, match="did not finish within 0 s"):
        trainer, rows = fit(tiny_model_path, tmp_path, poster, max_steps=20, every=10)
    last = poster.results[-1]
    assert (last["step"], last["status"], last["accuracy"]) == (20, "missing", None)
    assert "final wait" in last["error"]
    assert 20 not in eval_rows(rows)
    assert client.outstanding == []  # given up on: the evaluator skips or drops it
    assert not (tmp_path / "weights").exists()


def test_killed_evaluator_training_goes_on_and_it_restarts(client: EvaluatorClient, tiny_model_path: str, tmp_path: Path) -> None:
    poster = CheckpointPoster(client, "trial-2", tmp_path / "weights", final_wait_s=LOAD_TIMEOUT_S)
    killer = KillEvaluatorAfterFirstPost(client)
    # Train until a checkpoint posted after the kill was evaluated by the restarted worker.
    stopper = StopWhen(poster, lambda p: any(r["status"] == "ok" for r in p.results))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, rows = fit(tiny_model_path, tmp_path, poster, killer, stopper, max_steps=5000, every=200)
    assert killer.killed is not None
    dead_pid, kill_step = killer.killed
    assert trainer.global_step > kill_step
    deaths = [w for w in caught if issubclass(w.category, EvaluatorWarning) and "died" in str(w.message)]
    assert len(deaths) == 1, [str(w.message) for w in caught]
    first = poster.results[0]
    assert (first["step"], first["status"], first["accuracy"]) == (kill_step, "missing", None)
    assert kill_step not in eval_rows(rows)  # a lost evaluation is never an accuracy of 0
    later = [r for r in poster.results if r["status"] == "ok"]
    assert later and all(r["step"] > kill_step for r in later)
    assert sorted(eval_rows(rows)) == [r["step"] for r in later]
    assert client.pid not in (None, dead_pid)


def test_failed_evaluations_are_kept_and_never_logged(tiny_model_path: str, tmp_path: Path) -> None:
    """An evaluator whose model does not match the checkpoints answers every post with an error."""
    from lit_sft.tiny import build_tiny_model

    other = tmp_path / "other-model"
    build_tiny_model(other, num_hidden_layers=1, hidden_size=32)
    config = EvaluatorConfig(device="cpu", num_problems=4, max_new_tokens=8)
    with EvaluatorClient(str(other), PROBLEMS, config) as mismatched:
        poster = CheckpointPoster(mismatched, "trial-3", tmp_path / "weights", final_wait_s=LOAD_TIMEOUT_S)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, rows = fit(tiny_model_path, tmp_path, poster, max_steps=20, every=10)
    assert trainer.global_step == 20
    assert [(r["step"], r["status"], r["accuracy"]) for r in poster.results] == [(10, "error", None), (20, "error", None)]
    assert all("cannot load checkpoint" in r["error"] for r in poster.results)
    failures = [w for w in caught if issubclass(w.category, EvaluatorWarning)]
    assert len(failures) == 2 and "step 10 failed" in str(failures[0].message)
    assert eval_rows(rows) == {}


@pytest.mark.gpu
def test_gpu_training_posts_to_a_gpu_evaluator(tiny_model_path: str, tmp_path: Path) -> None:
    config = EvaluatorConfig(device="auto", num_problems=8, max_new_tokens=16, batch_size=8)
    with EvaluatorClient(tiny_model_path, PROBLEMS, config, train_device="cuda:0") as gpu_client:
        poster = CheckpointPoster(gpu_client, "gpu", tmp_path / "weights", final_wait_s=LOAD_TIMEOUT_S)
        trainer, rows = fit(tiny_model_path, tmp_path, poster, max_steps=40, every=20, accelerator="gpu")
    assert [(r["step"], r["status"]) for r in poster.results] == [(20, "ok"), (40, "ok")]
    assert sorted(eval_rows(rows)) == [20, 40]
