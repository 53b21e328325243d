"""Bad input to tune.py: one `error: ...` line, exit 2, no traceback, and nothing written over.

Search-space validation itself is tested in test_search_space.py and two CLI cases in
test_tuning.py; here each kind of mistake goes through the CLI with a study already on disk,
which must come out of it byte for byte as it was.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

import tune as tune_cli
from lit_sft.cli import run_cli
from tests.test_workers import ROOT, SPACE, tune_env

SECRET = "hunter2-s3cret"


def _argv(model_path: str, tmp_path: Path, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    if not space.exists():
        space.write_text(SPACE)
    return [
        "--model.model_name_or_path", model_path,
        "--data.num_generated", "160", "--data.eval_size", "16", "--data.max_length", "128",
        "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--evaluator.enabled", "false", "--wandb.enabled", "false",
        "--study.name", "bad", "--study.results_dir", str(tmp_path / "results"), "--study.search_space", str(space),
        "--study.plots", "false", "--study.heartbeat_interval_s", "null",
        *extra,
    ]


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_untouched(folder: Path, before: dict[str, tuple[bytes, int]]) -> None:
    """Every file as it was (content and mtime); the only new file allowed is the study's empty lock."""
    after = _snapshot(folder)
    assert {k: after.get(k) for k in before} == before
    assert set(after) - set(before) <= {"optuna.db.study-lock"}


@pytest.fixture
def existing_study(tmp_path: Path) -> Path:
    """A results folder from an earlier run: a minimizing study with one trial, and its report."""
    results = tmp_path / "results"
    results.mkdir()
    study = optuna.create_study(study_name="bad", storage=f"sqlite:///{results / 'optuna.db'}", direction="minimize")
    study.add_trial(optuna.trial.create_trial(value=1.0, params={"learning_rate": 1e-3},
                                              distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-4, 5e-2, log=True)}))
    (results / "study_results.yaml").write_text("study: bad\n")
    return results


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    return _error_line(capsys.readouterr())


def _error_line(captured: pytest.CaptureResult) -> str:
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def _space(tmp_path: Path, entry: str) -> str:
    path = tmp_path / "bad_space.yaml"
    path.write_text(entry + "\n")
    return str(path)


@pytest.mark.parametrize(
    "entry, needle",
    [
        ("lr: {kind: uniform, low: 1.0e-4, high: 1.0e-2, key: model.learning_rate}", "kind must be one of float, int, categorical"),
        ("lr: {kind: float, low: 1.0e-2, high: 1.0e-4, key: model.learning_rate}", "low (0.01) > high (0.0001)"),
        ("lr: {kind: float, low: 0.0, high: 1.0e-2, log: true, key: model.learning_rate}", "log scale needs low > 0"),
        ("bs: {kind: categorical, choices: [], key: data.batch_size}", "choices must be a non-empty list"),
        ("lr: {kind: float, low: 1.0e-4, high: 1.0e-2, key: model.learning_rat}", "key 'model.learning_rat' maps to no config key"),
    ],
    ids=["unknown-kind", "low-above-high", "log-with-zero-low", "empty-choices", "unknown-key"],
)
def test_a_bad_search_space_writes_nothing(tiny_model_path, tmp_path, capsys, existing_study, entry, needle):
    before = _snapshot(existing_study)
    argv = _argv(tiny_model_path, tmp_path, "--study.search_space", _space(tmp_path, entry))
    assert run_cli(tune_cli.main, argv) == 2
    assert needle in _one_error_line(capsys)
    _assert_untouched(existing_study, before)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model.learning_rat", "1e-3"], "learning_rat"),
        (["--study.n_trials", "-3"], "study.n_trials must be >= 1 or null, got -3"),
        (["--study.max_retries", "-1"], "study.max_retries must be >= 0"),
        (["--study.storage", "redis://localhost/0"], "study.storage: unsupported URL"),
        (["--study.storage", "sqlite:///:memory:"], "in-memory SQLite study ends with its process"),
        (["--trainer.devices", "2", "--trainer.strategy", "ddp_spawn"], "trainer.strategy=ddp_spawn"),
        (["--trainer.devices", "2", "--trainer.strategy", "fsdp"], "trainer.strategy=fsdp: the evaluator and study.save_best_model"),
        (["--trainer.devices", "2", "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu"], "trainer.strategy=fsdp needs GPUs"),
        (["--trainer.devices", "2", "--trainer.num_nodes", "2"], "trainer.num_nodes: a trial runs on one machine"),
    ],
    ids=["unknown-config-key", "negative-n-trials", "negative-max-retries", "unsupported-storage", "in-memory-storage", "ddp-spawn",
         "fsdp-with-evaluator", "fsdp-on-cpu", "several-nodes"],
)
def test_bad_config_writes_nothing(tiny_model_path, tmp_path, capsys, existing_study, extra, needle):
    before = _snapshot(existing_study)
    argv = _argv(tiny_model_path, tmp_path, *extra)
    if "fsdp" in extra:
        argv[argv.index("--evaluator.enabled") + 1] = "true"
    assert run_cli(tune_cli.main, argv) == 2
    assert needle in _one_error_line(capsys)
    _assert_untouched(existing_study, before)


def test_an_existing_study_with_the_opposite_direction_is_refused(tiny_model_path, tmp_path, capsys, existing_study):
    before = _snapshot(existing_study)
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.direction", "maximize")) == 2
    line = _one_error_line(capsys)
    assert "study.direction: study 'bad'" in line and "was created to minimize, not maximize" in line
    _assert_untouched(existing_study, before)
    assert len(optuna.load_study(study_name="bad", storage=f"sqlite:///{existing_study / 'optuna.db'}").trials) == 1


def test_a_results_folder_that_cannot_be_created(tiny_model_path, tmp_path, capsys):
    # Root may write anywhere, so the folder is made impossible: it would be inside a file.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file\n")
    argv = _argv(tiny_model_path, tmp_path)
    argv[argv.index("--study.results_dir") + 1] = str(blocker / "results")
    assert run_cli(tune_cli.main, argv) == 2
    assert f"study.results_dir: cannot create {blocker / 'results'}: Not a directory" in _one_error_line(capsys)
    assert blocker.read_text() == "a regular file\n"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket is closed


def test_an_unreachable_storage_fails_fast_with_its_password_masked(tiny_model_path, tmp_path, capsys):
    url = f"postgresql://lit:{SECRET}@127.0.0.1:{_closed_port()}/optuna"
    start = time.monotonic()
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.storage", url)) == 2
    elapsed = time.monotonic() - start
    captured = capsys.readouterr()
    line = _error_line(captured)
    assert "study.storage: cannot connect to postgresql://lit:***@127.0.0.1" in line
    assert SECRET not in captured.out + captured.err
    assert elapsed < 15


def test_the_real_cli_prints_one_line_and_exits_2(tiny_model_path, tmp_path):
    """The same as a real process: no traceback reaches the terminal, the password never does."""
    url = f"postgresql://lit:{SECRET}@127.0.0.1:{_closed_port()}/optuna"
    argv = [sys.executable, str(ROOT / "tune.py"), *_argv(tiny_model_path, tmp_path, "--study.storage", url)]
    result = subprocess.run(argv, cwd=tmp_path, env=tune_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("error: study.storage: cannot connect to postgresql://lit:***@")
    assert "Traceback" not in result.stderr and SECRET not in result.stdout + result.stderr
    assert not (tmp_path / "results" / "optuna.db").exists()


# ---- bad input found before any work: no study, no trial, no W&B run -------------------------


def test_a_broken_data_line_is_found_before_the_study_has_a_new_trial(tiny_model_path, tmp_path, capsys, existing_study):
    good = '{"prompt": "Q: 1+1? A: <think>", "response": " 2 </think> <answer>2</answer>", "ground_truth": "2"}\n'
    data = tmp_path / "train.jsonl"
    data.write_text(good * 40 + '{"prompt": "Q: 2+2?", "response" " 4"}\n' + good * 5)
    before = _snapshot(existing_study)
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--data.train_path", str(data))) == 2
    assert f"{data}:41: invalid JSON: Expecting ':' delimiter (column 34)" in _one_error_line(capsys)
    _assert_untouched(existing_study, before)
    assert len(optuna.load_study(study_name="bad", storage=f"sqlite:///{existing_study / 'optuna.db'}").trials) == 1


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model.learning_rate=-1e-3"], "model.learning_rate must be > 0, got -0.001"),
        (["--model.weight_decay", "-0.1"], "model.weight_decay must be >= 0, got -0.1"),
        (["--model.warmup_ratio", "1.5"], "model.warmup_ratio must be in [0, 1], got 1.5"),
        (["--data.micro_batch_size", "0"], "data.micro_batch_size must be an integer >= 1, got 0"),
        (["--early_stopping.patience", "0"], "early_stopping.patience must be an integer >= 1, got 0"),
        (["--evaluator.num_problems", "0", "--evaluator.enabled", "true"], "evaluator.num_problems: must be at least 1"),
        (["--trainer.val_check_interval", "10", "--budget.examples", "null", "--budget.eval_every_examples", "null"],
         "trainer.val_check_interval (10 steps) > trainer.max_steps (4)"),
        (["--study.metric", "eval/accuracy"], "study.metric: eval/accuracy comes from the evaluator"),
    ],
    ids=["negative-lr", "negative-wd", "warmup-above-1", "zero-micro-batch", "zero-patience", "zero-problems", "no-evaluation", "accuracy-without-evaluator"],
)
def test_out_of_range_values_are_one_line_before_any_run(tiny_model_path, tmp_path, capsys, existing_study, extra, needle):
    before = _snapshot(existing_study)
    argv = _argv(tiny_model_path, tmp_path, "--wandb.enabled", "true", "--wandb.save_dir", str(tmp_path / "wandb"), *extra)
    assert run_cli(tune_cli.main, argv) == 2
    assert needle in _one_error_line(capsys)
    _assert_untouched(existing_study, before)
    assert not (tmp_path / "wandb").exists()  # no W&B run was started


def test_a_search_space_choice_out_of_range_is_refused_with_its_line(tiny_model_path, tmp_path, capsys, existing_study):
    space = tmp_path / "zero_batch.yaml"
    space.write_text("lr: {kind: float, low: 1.0e-4, high: 1.0e-2, log: true, key: model.learning_rate}\n"
                     "bs:\n  kind: categorical\n  choices: [0, 8]\n  key: data.batch_size\n")
    before = _snapshot(existing_study)
    assert run_cli(tune_cli.main, _argv(tiny_model_path, tmp_path, "--study.search_space", str(space))) == 2
    assert "bs=0 (line 2): data.batch_size must be an integer >= 1, got 0" in _one_error_line(capsys)
    _assert_untouched(existing_study, before)


def test_a_malformed_config_names_its_file_and_line(tiny_model_path, tmp_path, capsys, existing_study):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  learning_rate: 1.0e-3\n  weight_decay: [0.1\ndata:\n  batch_size: 8\n")
    assert run_cli(tune_cli.main, ["--config", str(config), *_argv(tiny_model_path, tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert f"{config}: line 3, column 17: not valid YAML" in line and "<unicode string>" not in line
