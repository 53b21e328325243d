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
    with pytest.raises(UserError, match="search space: no such file: .*nope.yaml"):
        load_search_space(tmp_path / "nope.yaml")


def test_broken_yaml_names_file_line_and_column(tmp_path):
    path = _write(tmp_path, "lr:\n  kind: float\n  low: [1e-5\n  high: 1e-4\n")
    with pytest.raises(UserError) as err:
        load_search_space(path)
    assert str(err.value).startswith(f"{path}: line 3, column 8: not valid YAML")


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


# ---- a value searched normalised by another (`scale`) ---------------------------------------------

SCALED = """\
learning_rate:
  kind: float
  low: 1.0e-4
  high: 3.0e-2
  log: true
  key: model.learning_rate
  scale: {with: batch_size, rule: sqrt, reference: 32}
batch_size: {kind: categorical, choices: [8, 16, 32, 64], key: data.batch_size}
weight_decay: {kind: float, low: 0.0, high: 0.1, key: model.weight_decay, scale: {with: batch_size, rule: linear, reference: 16}}
"""


def test_scaled_entries_apply_their_rule_and_the_sampler_keeps_the_normalised_value(tmp_path):
    space = load_search_space(_write(tmp_path, SCALED), CFG)
    assert space.scaled
    assert space.scales() == {"learning_rate": "learning_rate = sampled x sqrt(batch_size / 32)",
                              "weight_decay": "weight_decay = sampled x (batch_size / 16)"}
    sampled = {"learning_rate": 2e-3, "batch_size": 8, "weight_decay": 0.04}
    applied = space.applied(sampled)
    assert applied == {"learning_rate": pytest.approx(1e-3), "batch_size": 8, "weight_decay": pytest.approx(0.02)}
    assert space.applied({**sampled, "batch_size": 32})["learning_rate"] == pytest.approx(2e-3)  # the reference: as sampled
    assert space.applied({**sampled, "batch_size": 64})["learning_rate"] == pytest.approx(2e-3 * math.sqrt(2))
    cfg = space.apply(CFG, sampled)
    assert cfg["model"]["learning_rate"] == pytest.approx(1e-3)
    assert cfg["model"]["weight_decay"] == pytest.approx(0.02)
    assert cfg["data"]["batch_size"] == 8
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = space.suggest(trial)
    assert trial.params == values  # what TPE models: the normalised value, in the space's range
    assert 1e-4 <= trial.params["learning_rate"] <= 3e-2


def test_a_plain_space_applies_what_it_samples():
    space = load_search_space(CONFIGS / "search_space.yaml", CFG)
    values = {"learning_rate": 3e-5, "batch_size": 64, "weight_decay": 0.01}
    assert not space.scaled and space.scales() == {}
    assert space.applied(values) == values


def test_every_scale_problem_is_reported_with_its_line(tmp_path):
    path = _write(tmp_path, """\
lr: {kind: float, low: 1.0e-4, high: 1.0e-2, log: true, key: model.learning_rate, scale: {with: bs, rule: cube, reference: 0, by: 2}}
batch_size: {kind: categorical, choices: [0, 16], key: data.batch_size}
wd: {kind: float, low: 0.0, high: 0.1, key: model.weight_decay, scale: {with: wd, rule: sqrt, reference: 1}}
warmup: {kind: float, low: 0.0, high: 0.1, key: model.warmup_ratio, scale: [batch_size]}
min_lr: {kind: float, low: 0.0, high: 0.5, key: model.min_lr_ratio, scale: {with: batch_size, rule: sqrt, reference: 8}}
clip: {kind: float, low: 0.5, high: 2.0, key: model.gradient_clip_val, scale: {with: min_lr, rule: linear, reference: 1}}
steps: {kind: int, low: 10, high: 100, key: trainer.max_steps, scale: {with: batch_size, rule: linear, reference: 8}}
decay: {kind: float, low: 0.0, high: 0.1, key: model.weight_decay_x, scale: {rule: sqrt}}
""")
    with pytest.raises(UserError) as err:
        load_search_space(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "line 1, lr: scale: unknown field 'by' (allowed: with, rule, reference)" in msg
    assert "line 1, lr: scale.rule must be one of sqrt, linear, got 'cube'" in msg
    assert "line 1, lr: scale.reference must be a number > 0, got 0" in msg
    assert "line 1, lr: scale.with 'bs' is no entry of this file (entries: batch_size, wd, warmup, min_lr, clip, steps, decay)" in msg
    assert "line 3, wd: scale.with names the entry itself ('wd'), not another entry such as batch_size" in msg
    assert "line 4, warmup: scale must be a mapping {with: <entry>, rule: sqrt | linear, reference: <number > 0>}, got ['batch_size']" in msg
    assert "line 5, min_lr: scale.with 'batch_size' can take 0, and a scale needs positive numbers" in msg
    assert "line 6, clip: scale.with 'min_lr' is normalised itself: scale by an entry that is searched as it is" in msg
    assert "line 7, steps: unknown field 'scale' (allowed for kind int:" in msg
    assert "line 8, decay: scale.with is missing" in msg and "line 8, decay: scale.reference is missing" in msg
    assert msg.count("line ") == 11


def test_corners_are_checked_at_the_applied_values(tmp_path):
    # warmup_ratio must stay in [0, 1]: 0.2 is fine as sampled, 0.2 x 64 / 8 = 1.6 is not.
    cfg = {**CFG, "model": {**CFG["model"], "warmup_ratio": 0.05}}
    text = """\
warmup: {kind: float, low: 0.05, high: 0.2, key: model.warmup_ratio, scale: {with: batch_size, rule: linear, reference: 8}}
batch_size: {kind: categorical, choices: [8, 32, 64], key: data.batch_size}
"""
    with pytest.raises(UserError) as err:
        load_search_space(_write(tmp_path, text), cfg)
    msg = str(err.value)
    # Only the corner at the largest batch is out of range (0.2 x 32 / 8 = 0.8 and 0.05 x 64 / 8 = 0.4 are not).
    assert msg == (f"search space {tmp_path / 'space.yaml'}: 1 problem: warmup=0.2 (applied 1.6) (line 1), batch_size=64 (line 2): "
                   "model.warmup_ratio must be in [0, 1], got 1.6")
    # The same entry without the scale passes: the range check follows the applied value.
    load_search_space(_write(tmp_path, text.replace(", scale: {with: batch_size, rule: linear, reference: 8}", "")), cfg)
