"""bench/curves.py: the recorded-curve table (resumable, deterministic draws) and studies replayed
on it with Optuna's samplers and the tuner's pruner at an equal budget."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys

import pytest

from bench import curves, replay
from lit_sft.search_space import load_search_space
from tests.test_workers import ROOT, tune_env

SPACE_META = {
    "batch_size": {"kind": "categorical", "choices": [8, 16, 32, 64], "low": None, "high": None, "log": False},
    "learning_rate": {"kind": "float", "choices": None, "low": 1e-4, "high": 3e-2, "log": True},
    "weight_decay": {"kind": "float", "choices": None, "low": 0.0, "high": 0.1, "log": False},
}


def _synthetic_table(n: int = 60) -> dict:
    """Curves with a clear optimum (learning rate 2e-3, batch 8), so a good sampler finds it."""
    space = load_search_space(ROOT / "configs" / "search_space_tiny.yaml")
    rows = []
    for i in range(n):
        params = curves.draw(space, i)
        off = abs(math.log(params["learning_rate"] / 2e-3)) + 0.3 * math.log2(params["batch_size"] / 8)
        examples = list(range(512, 4608 + 1, 512))
        loss = [round(0.05 + off + 2.0 / (1 + x / 512), 5) for x in examples]
        rows.append({"i": i, "params": params, "examples": examples, "loss": loss, "acc": [round(max(0.0, 1 - l), 4) for l in loss],
                     "seconds": 1.0})
    return {"meta": {"examples": 4608, "eval_every_examples": 512, "space": SPACE_META}, "configs": rows}


def test_draws_are_the_same_for_everyone_and_the_table_is_rewritten_whole(tmp_path):
    space = load_search_space(ROOT / "configs" / "search_space_tiny.yaml")
    assert curves.draw(space, 3) == curves.draw(space, 3) != curves.draw(space, 4)
    assert {curves.draw(space, i)["batch_size"] for i in range(40)} == {8, 16, 32, 64}
    table = _synthetic_table(3)
    path = tmp_path / "t.json"
    curves.write_table(table, path)
    assert curves.load_table(path) == json.loads(path.read_text()) == table
    assert len(path.read_text().splitlines()) == 3 + 3 + 2  # one line a configuration
    assert not list(tmp_path.glob(".t.json.*"))  # written through a temporary file, renamed


def test_curve_row_keys_accuracy_by_the_examples_of_its_checkpoint():
    result = {"history": [{"step": 8, "examples_seen": 512, "eval/loss": 1.5}, {"step": 8, "examples_seen": 512, "train/loss": 2.0},
                          {"step": 16, "examples_seen": 1024, "eval/loss": 1.25}],
              "evaluations": [{"step": 16, "status": "ok", "accuracy": 0.25}, {"step": 8, "status": "missing"}], "seconds": 3.0}
    row = curves.curve_row(5, {"learning_rate": 0.0012345678, "batch_size": 64, "weight_decay": 0.0}, result, 64)
    assert row == {"i": 5, "params": {"learning_rate": 0.00123457, "batch_size": 64, "weight_decay": 0.0}, "examples": [512, 1024],
                   "loss": [1.5, 1.25], "acc": [None, 0.25], "seconds": 3.0}


def test_a_replayed_study_spends_its_budget_and_prunes_with_the_tuners_asha():
    raw = _synthetic_table()
    table = replay.Table(raw, 512)
    budget = 12 * 4608
    baseline = {"learning_rate": 2e-3, "batch_size": 32, "weight_decay": 0.0}
    plain = replay.run_study(replay.METHODS["random"], 1, table, budget, 3, 0.001, baseline)
    asha = replay.run_study(replay.METHODS["tpe_asha_baseline"], 1, table, budget, 3, 0.001, baseline)
    for trace in (plain, asha):
        assert budget <= trace.spent < budget + 4608
        losses = [trace.best_at(x)[0] for x in range(0, budget + 1, 4608)]
        assert losses == sorted(losses, reverse=True)  # what the study hands over only gets better
    assert plain.pruned == 0 and asha.pruned > 0 and asha.trials > plain.trials  # ASHA's savings bought configurations
    # The baseline ran first and in full: its evaluations are the first events, up to R.
    first = [e for e in asha.events if e[0] <= 4608]
    assert [e[0] for e in first] == list(range(512, 4608 + 1, 512))


def test_the_summary_compares_every_method_with_random_search_at_equal_budget():
    raw = _synthetic_table()
    budget = 12 * 4608
    traces = replay.replay_all(raw, ["random", "tpe_asha"], 6, eval_every=512, budget=budget, patience=3, min_delta=0.001,
                               baseline={"learning_rate": 2e-3, "batch_size": 32, "weight_decay": 0.0}, workers=1)
    rows, target = replay.summarise(traces, budget)
    by = {r["method"]: r for r in rows}
    assert by["random"]["ratio"] == 1.0 and by["random"]["win_rate"] == 0.5 and by["random"]["seeds"] == 6
    assert 0 <= by["tpe_asha"]["win_rate"] <= 1 and by["tpe_asha"]["ratio"] > 0
    assert target == statistics.median(t.best_at(budget)[0] for s, t in traces["random"].items() if s != "__seconds__")
    assert "tpe_asha" in replay.format_rows(rows, budget)


@pytest.mark.slow
def test_record_continues_where_it_stopped(tmp_path):
    table = tmp_path / "table.json"
    argv = [sys.executable, str(ROOT / "bench" / "curves.py"), "record", "--examples", "256", "--eval-every", "128", "--table", str(table)]
    first = subprocess.run([*argv, "--configs", "1"], cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    one = curves.load_table(table)
    assert [r["i"] for r in one["configs"]] == [0] and one["configs"][0]["examples"] == [128, 256]
    second = subprocess.run([*argv, "--configs", "2"], cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "1 configurations recorded, 1 to go" in second.stdout
    two = curves.load_table(table)
    assert two["configs"][0] == one["configs"][0] and [r["i"] for r in two["configs"]] == [0, 1]
    assert all(a is not None for r in two["configs"] for a in r["acc"])  # graded at every evaluation
