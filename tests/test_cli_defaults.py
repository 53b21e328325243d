"""What a new user sees first: the defaults that run without --config, --help, and a quiet W&B start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train as train_cli
import tune as tune_cli
from lit_sft.config import DEFAULT_CONFIGS, parse

ROOT = Path(__file__).resolve().parents[1]


def _shipped(tune: bool) -> dict:
    return yaml.safe_load(DEFAULT_CONFIGS[tune].read_text())


@pytest.mark.parametrize("tune", [False, True], ids=["train", "tune"])
def test_without_config_the_shipped_default_runs(tune):
    cfg, shipped = parse([], tune=tune), _shipped(tune)
    for section, values in shipped.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if not isinstance(value, dict):
                    assert cfg[section][key] == value, (section, key)
    assert parse(["--model.learning_rate", "0.5"], tune=tune)["model"]["learning_rate"] == 0.5


@pytest.mark.parametrize("main, argv, shows", [
    (tune_cli.main, ["--help"], ["tune.py only: the examples the whole study", "Stop starting new trials after this", "Trials sampled at random before TPE",
                                 "Evaluate every this many examples"]),
    (train_cli.main, ["fit", "--help"], ["default: 0.002", "Peak AdamW learning rate", "Evaluations without an improvement"]),
], ids=["tune", "train"])
def test_help_shows_what_runs_and_what_each_key_means(capsys, main, argv, shows):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in shows:
        assert text in out, text
    if main is tune_cli.main:  # configs/tune.yaml's budget and no cap, not the code default of 20 trials
        n_trials = out.split("--study.n_trials N_TRIALS", 2)[-1][:600]
        assert "default: null)" in n_trials and "default: 20)" not in n_trials
        total = out.split("--budget.total_examples TOTAL_EXAMPLES", 2)[-1][:700]
        assert "default: 92160)" in total


def _start_a_run(code: str, tmp_path) -> str:
    """stderr of a fresh process that starts one offline W&B run (wandb warns once per process)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}.experiment.finish()"
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True).stderr


def test_a_wandb_run_starts_without_the_anonymous_warning(tmp_path):
    ours = "from lit_sft.wandb_run import make_logger; make_logger({'project': 'p', 'mode': 'offline', 'save_dir': '.'}, 'quiet', {})"
    assert "anonymous" not in _start_a_run(ours, tmp_path)
    # The check can fail: Lightning's own way of starting the run prints it.
    lightning = "from lightning.pytorch.loggers import WandbLogger; WandbLogger(project='p', save_dir='.', mode='offline')"
    assert "anonymous setting has no effect" in _start_a_run(lightning, tmp_path)


def test_shipped_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    """tune.py run from elsewhere still finds configs/search_space*.yaml (and rank processes the package)."""
    from lit_sft.study.config import PROJECT_ROOT, StudyConfig

    monkeypatch.chdir(tmp_path)
    assert (PROJECT_ROOT / "lit_sft" / "__init__.py").is_file()
    path = StudyConfig(search_space="configs/search_space_tiny.yaml").search_space_path()
    assert path == PROJECT_ROOT / "configs" / "search_space_tiny.yaml"
