"""The pure helpers of bench/search_efficiency.py: how examples to the target are counted."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load_bench(name: str):
    """A bench script as a module (bench/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


se = _load_bench("search_efficiency")


def trial(number, curve, state="COMPLETE", examples_attr=None):
    values = [v for _, v in curve]
    return se.TrialRecord(number=number, state=state, curve=list(curve), value=min(values) if values else None,
                          examples_attr=examples_attr)


def test_curve_sorted_by_examples():
    assert se.curve_from_intermediate({2000: 0.5, 500: 0.9, 1000: 0.7}) == [(500, 0.9), (1000, 0.7), (2000, 0.5)]


def test_examples_to_reach_counts_earlier_trials_in_full_and_the_hitting_one_up_to_the_hit():
    trials = [
        trial(1, [(100, 0.9), (200, 0.5)]),  # reaches at 200: after trial 0's 300
        trial(0, [(100, 1.0), (300, 0.8)], state="PRUNED"),
        trial(2, [(100, 0.4)]),  # after the hit: spent, not to target
    ]
    assert se.examples_to_reach(trials, target=0.5) == (500, 1, 600)


def test_examples_to_reach_never():
    assert se.examples_to_reach([trial(0, [(100, 1.0)]), trial(1, [(50, math.nan)])], target=0.5) == (None, None, 150)


def test_examples_include_steps_after_the_last_evaluation():
    assert trial(0, [(100, 1.0), (200, 0.9)], examples_attr=230).examples == 230
    assert trial(0, [(100, 1.0), (200, 0.9)], examples_attr=None).examples == 200
    assert trial(0, [], state="FAIL").examples == 0


def test_target_and_best():
    assert se.target_loss(2.0, 0.01) == pytest.approx(2.02)
    trials = [trial(0, [(100, 0.3)], state="PRUNED"), trial(1, [(100, 0.6), (200, 0.4)])]
    assert se.best_value(trials) == pytest.approx(0.4)  # the complete trials' best, as Optuna's best_value
    assert se.best_trial(trials).number == 1
    assert se.best_value([trial(0, [(100, 0.3)], state="PRUNED")]) == pytest.approx(0.3)


def test_ratios():
    assert se.ratio_of_sums([1, 2], [4, 8]) == pytest.approx(0.25)
    assert se.ratio_of_sums([1], [0]) is None
    assert se.geometric_mean([0.25, 1.0]) == pytest.approx(0.5)
    assert se.geometric_mean([]) is None


def test_table_and_random_overrides(tmp_path):
    text = se.format_table(["a", "bb"], [[1, None], [0.123456, "x"]])
    assert text.splitlines()[2].split() == ["1", "-"] and "0.1235" in text
    args = se.parse_args(["--quick"])
    random = se.study_overrides("random", 0, args, tmp_path, "n")
    assert random[random.index("--study.sampler.n_startup_trials") + 1] == str(args.n_trials)
    assert random[random.index("--study.pruner.enabled") + 1] == "false"
    tpe = se.study_overrides("tpe_asha", 0, args, tmp_path, "n")
    assert "--study.sampler.n_startup_trials" not in tpe and "--study.pruner.enabled" not in tpe


def test_pruner_replay_cuts_curves_where_asha_prunes():
    replay = _load_bench("pruner_replay")
    fast = [(512, 0.86), (1024, 0.752), (2048, 0.30), (3072, 0.24)]
    slow = [(512, 1.11), (1024, 0.7555), (2048, 0.25), (3072, 0.20)]
    strict = replay.replay([fast, slow], replay.Setting(min_resource=1024, reduction_factor=3, tolerance=0.0))
    assert [t.state for t in strict] == ["COMPLETE", "PRUNED"] and strict[1].curve == slow[:2]
    tolerant = replay.replay([fast, slow], replay.Setting(min_resource=1024, reduction_factor=3, tolerance=0.05))
    assert [t.state for t in tolerant] == ["COMPLETE", "COMPLETE"]
    # Random search reaches the best (0.20) at 3072 + 3072; strict ASHA never does, tolerant ASHA with random's count.
    pool = [fast, slow]
    assert replay.measure(pool, replay.Setting(1024, 3, 0.05), n_trials=2, draws=20)["kept"] == 1.0
    assert replay.measure(pool, replay.Setting(1024, 3, 0.0), n_trials=2, draws=20)["kept"] < 1.0


def test_variant_spaces_keep_random_search_plain():
    space = {"learning_rate": {"kind": "float", "low": 1e-4, "high": 3e-2, "log": True, "key": "model.learning_rate",
                               "scale": {"with": "batch_size", "rule": "sqrt", "reference": 32}},
             "batch_size": {"kind": "categorical", "choices": [8, 64], "key": "data.batch_size"}}
    assert "scale" not in se.variant_space(space, "none", 32)["learning_rate"]
    assert se.variant_space(space, "linear", 16)["learning_rate"]["scale"] == {"with": "batch_size", "rule": "linear", "reference": 16}
    assert se.variant_space(space, None, 32) is space
    assert space["learning_rate"]["scale"]["rule"] == "sqrt"  # the source is not changed
    with pytest.raises(ValueError):
        se.variant_space({"batch_size": space["batch_size"]}, "sqrt", 32)


def test_variant_flags_become_tpe_asha_overrides_only(tmp_path):
    args = se.parse_args(["--quick", "--sampler", "gp", "--n-startup", "2", "--n-ei-candidates", "48", "--univariate",
                          "--measure-at", "2"])
    args.random_space, args.tpe_asha_space = tmp_path / "r.yaml", tmp_path / "t.yaml"
    tpe = se.study_overrides("tpe_asha", 0, args, tmp_path, "n")
    joined = " ".join(tpe)
    assert "--study.sampler.kind gp --study.sampler.n_startup_trials 2 --study.sampler.n_ei_candidates 48" in joined
    assert "--study.sampler.multivariate false" in joined and f"--study.search_space {tmp_path / 't.yaml'}" in joined
    random = " ".join(se.study_overrides("random", 0, args, tmp_path, "n"))
    assert f"--study.search_space {tmp_path / 'r.yaml'}" in random
    assert "--study.sampler.kind tpe --study.sampler.n_startup_trials 3 --study.pruner.enabled false" in random
    assert "48" not in random and "multivariate" not in random
    assert args.measure_at == [2, 3]
    with pytest.raises(SystemExit):
        se.parse_args(["--quick", "--measure-at", "4"])


def test_measuring_at_fewer_trials_takes_each_study_s_first_ones():
    trials = [trial(n, [(100, 1.0 - n / 10)]) for n in range(5)]
    assert [t.number for t in se.truncate(trials, 3)] == [0, 1, 2]
    guided = [trial(0, [(100, 0.95)]), trial(1, [(100, 0.5)]), trial(2, [(100, 0.1)])]
    summary = se.summarize_seed({"random": se.truncate(trials, 3), "tpe_asha": se.truncate(guided, 2)}, 0.01)
    assert summary["random_best"] == pytest.approx(0.8)  # random's best of its first 3, not of all 5
    assert summary["methods"]["tpe_asha"]["examples_to_target"] == 200
    assert summary["methods"]["tpe_asha"]["best_loss"] == pytest.approx(0.5)  # trial 2 is beyond the count


def test_floor_rounding_replaces_the_budget_rule_everywhere_the_tuner_reads_it(tmp_path):
    import subprocess

    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, lit_sft.config, lit_sft.training, lit_sft.study.objective\n"
        "cfg = {'budget': {'examples': 20000, 'eval_every_examples': 2000}, 'data': {'batch_size': 64}, 'trainer': {}}\n"
        "print([m.apply_budget(cfg)['trainer']['val_check_interval'] for m in (lit_sft.config, lit_sft.training, lit_sft.study.objective)],"
        " sys.argv[1:])\n")
    header = f"ROOT, TUNE = {str(se.ROOT)!r}, {str(probe)!r}\n"
    out = subprocess.run([sys.executable, "-c", header + se.FLOOR_ROUNDING, "--a", "1"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[31, 31, 31] ['--a', '1']"  # 2000 // 64: evaluations every 1,984 examples, the old rule
    from lit_sft.config import apply_budget

    assert apply_budget({"budget": {"eval_every_examples": 2000}, "data": {"batch_size": 64}, "trainer": {}})["trainer"]["val_check_interval"] == 32
