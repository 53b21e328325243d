"""Search space files: the shipped ones, validation messages, sampling and applying to a config."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from lit_sft.errors import UserError
from lit_sft.search_space import load_search_space

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CFG = {
    "model": {"learning_rate": 1e-3, "weight_decay": 0.0},
    "data": {"batch_size": 32, "micro_batch_size": None},
    "trainer": {"max_steps": 10},
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_shipped_spaces_are_the_documented_ones():
    ref = load_search_space(CONFIGS / "search_space.yaml", CFG)
    by_name = {p.name: p for p in ref.params}
    assert ref.names == ["learning_rate", "batch_size", "weight_decay"]
    lr, bs, wd = by_name["learning_rate"], by_name["batch_size"], by_name["weight_decay"]
    assert (lr.kind, lr.low, lr.high, lr.log, lr.key) == ("float", 5e-6, 1e-4, True, "model.learning_rate")
    assert (bs.kind, bs.choices, bs.key) == ("categorical", (32, 64, 128, 256), "data.batch_size")
    assert (wd.kind, wd.low, wd.high, wd.log, wd.key) == ("float", 0.0, 0.1, False, "model.weight_decay")

    tiny = {p.name: p for p in load_search_space(CONFIGS / "search_space_tiny.yaml", CFG).params}
    assert (tiny["learning_rate"].low, tiny["learning_rate"].high) == (1e-4, 3e-2)
    assert tiny["batch_size"].choices == (8, 16, 32, 64)
    assert tiny["batch_size"].largest == 64


def test_every_problem_is_reported_once_with_file_line_and_entry(tmp_path):
    path = _write(tmp_path, """\
learning_rate: {kind: float, low: 1.0e-2, high: 1.0e-4, log: true, key: model.learning_rate}
batch_size: {kind: categorical, choices: [], key: data.batch_size}
weight_decay: {kind: uniform, low: 0, high: 0.1, key: model.weight_decay}
warmup: {kind: float, low: 0.0, high: 0.1, key: model.warmup_fraction}
beta: {kind: float, low: 0.0, high: 0.9, log: true, key: model.learning_rate}
steps: {kind: int, low: 10, hihg: 100, key: trainer.max_steps}
""")
    with pytest.raises(UserError) as err:
        load_search_space(path, CFG)
    msg = str(err.value)
    assert "\n" not in msg  # the CLI prints it as one `error:` line
    assert str(path) in msg
    assert "line 1, learning_rate: low (0.01) > high (0.0001)" in msg
    assert "line 2, batch_size: choices must be a non-empty list" in msg
    assert "line 3, weight_decay: kind must be one of float, int, categorical, got 'uniform'" in msg
    assert "line 4, warmup: key 'model.warmup_fraction' maps to no config key" in msg
    assert "line 5, beta: log scale needs low > 0, got low=0.0" in msg
    assert "line 6, steps: high is missing" in msg
    assert "line 6, steps: unknown field 'hihg'" in msg
    assert "learning_rate, beta: all set model.learning_rate" in msg
    assert msg.count("line ") == 7


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="expected a mapping"):
        load_search_space(_write(tmp_path, "- learning_rate\n"))
    with pytest.raises(UserError, match="cannot read search space"):
        load_search_space(tmp_path / "nope.yaml")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads 5e-6 as the string "5e-6"; the space accepts it as the number it plainly is.
    space = load_search_space(_write(tmp_path, "lr: {kind: float, low: 5e-6, high: 1e-4, log: true, key: model.learning_rate}\n"), CFG)
    assert (space.params[0].low, space.params[0].high) == (5e-6, 1e-4)


def test_suggest_stays_in_range_and_apply_sets_dotted_keys(tmp_path):
    space = load_search_space(CONFIGS / "search_space.yaml", CFG)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", sampler=optuna.samplers.RandomSampler(seed=0))
    seen_batches = set()
    for _ in range(12):
        trial = study.ask()
        values = space.suggest(trial)
        assert 5e-6 <= values["learning_rate"] <= 1e-4
        assert 0.0 <= values["weight_decay"] <= 0.1
        assert values["batch_size"] in (32, 64, 128, 256)
        seen_batches.add(values["batch_size"])
        cfg = space.apply(CFG, values)
        assert cfg["model"]["learning_rate"] == values["learning_rate"]
        assert cfg["data"]["batch_size"] == values["batch_size"]
        assert cfg["model"]["weight_decay"] == values["weight_decay"]
        study.tell(trial, values["learning_rate"])
    assert len(seen_batches) > 1
    assert CFG["model"]["learning_rate"] == 1e-3  # apply copies; the base config is untouched
    # log scale: the samples spread over decades, not bunched near the top of the range
    lrs = [t.params["learning_rate"] for t in study.trials]
    assert min(lrs) < 2e-5 and math.log10(max(lrs) / min(lrs)) > 0.8
