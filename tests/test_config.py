"""Every config under configs/ parses; overrides take effect; bad keys are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_sft.config import complete, parse
from lit_sft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "search_space" not in p.name)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_parses_and_starts_with_its_command(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # configs name data paths relative to the project root
    first = path.read_text().splitlines()[0]
    assert first.startswith("# python "), f"{path} must start with the command that runs it"
    tune = path.name.startswith("tune")
    local = []
    if "qwen" in str(path):  # its Hub datasets, as local copies (nothing is downloaded in tests)
        from tests.math_datasets import reference_data

        local = [arg for key, value in reference_data(tmp_path).items() for arg in (f"--{key}", value)]
    cfg = parse(["--config", str(path), *local], tune=tune)
    assert cfg["trainer"]["max_steps"] > 0 and cfg["data"]["batch_size"] > 0
    assert ("study" in cfg) == tune


def test_dotted_overrides_take_effect():
    cfg = parse(["--config", str(ROOT / "configs/sft.yaml"), "--model.learning_rate", "1e-5", "--data.batch_size", "64", "--model.weight_decay", "0.01"])
    assert cfg["model"]["learning_rate"] == 1e-5
    assert cfg["data"]["batch_size"] == 64
    assert cfg["model"]["weight_decay"] == 0.01


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model.lerning_rate", "1e-3"], "lerning_rate"),
        (["--data.batch_size", "many"], "batch_size"),
        (["--data.train_path", "/nonexistent/sft.jsonl"], "/nonexistent/sft.jsonl"),
        (["--trainer.max_steps", "0"], "max_steps"),
        (["--trainer.accumulate_grad_batches", "4"], "micro_batch_size"),
    ],
)
def test_bad_config_is_one_clear_user_error(argv, needle):
    with pytest.raises(UserError, match=needle):
        parse(argv)


def test_partial_config_is_completed_and_unknown_keys_rejected():
    cfg = complete({"model": {"learning_rate": 0.5}})
    assert cfg["model"]["learning_rate"] == 0.5 and cfg["early_stopping"]["patience"] == 3
    with pytest.raises(UserError, match="model.lerning_rate"):
        complete({"model": {"lerning_rate": 0.5}})


def test_example_budget_sets_steps_and_eval_cadence_per_batch_size():
    from lit_sft.config import apply_budget

    base = complete({"budget": {"examples": 20000, "eval_every_examples": 2000}})
    for batch, steps, every in ((8, 2500, 250), (64, 313, 32)):
        cfg = apply_budget({**base, "data": {**base["data"], "batch_size": batch}})
        assert (cfg["trainer"]["max_steps"], cfg["trainer"]["val_check_interval"]) == (steps, every)


def test_every_batch_size_is_evaluated_at_each_rung_or_just_past_it():
    """Rungs at 4,000 and 12,000 examples: no batch size reaches one late by more than one step
    per evaluation before it (rounding the interval down had batch 64 judged at 5,952)."""
    from lit_sft.config import apply_budget

    base = complete({"budget": {"examples": 20000, "eval_every_examples": 2000}})
    for batch in (8, 16, 32, 64, 128, 256):
        cfg = apply_budget({**base, "data": {**base["data"], "batch_size": batch}})
        every = cfg["trainer"]["val_check_interval"] * batch
        evaluations = [k * every for k in range(1, cfg["trainer"]["max_steps"] // cfg["trainer"]["val_check_interval"] + 1)]
        for rung in (4000, 12000):
            judged = min(e for e in evaluations if e >= rung)
            assert judged - rung < (rung // 2000) * batch, (batch, rung, judged)
    assert apply_budget(complete({}))["trainer"]["max_steps"] == complete({})["trainer"]["max_steps"]
    with pytest.raises(UserError, match="budget.examples"):
        parse(["--budget.examples", "0"])
