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


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif key not in ("config", "__default_config__"):
            out[f"{prefix}{key}"] = value
    return out


def test_a_partial_config_goes_on_top_of_the_embedded_default(tmp_path, capsys):
    partial = tmp_path / "mine.yaml"
    partial.write_text("model:\n  learning_rate: 0.001\n")
    cfg = parse(["--config", str(partial)], tune=True)
    shipped = _shipped(True)
    assert cfg["model"]["learning_rate"] == 0.001
    # Everything else is configs/tune.yaml's, not the code's defaults (20 trials, study lit-sft, no budget).
    assert cfg["study"]["name"] == shipped["study"]["name"] == "tiny-math"
    assert cfg["study"]["search_space"] == shipped["study"]["search_space"]
    assert cfg["budget"]["total_examples"] == shipped["budget"]["total_examples"] and cfg["study"]["n_trials"] is None
    assert f"config: {partial} over configs/tune.yaml" in capsys.readouterr().out


@pytest.mark.parametrize("name, tune", [("tune", True), ("sft", False)])
def test_the_reference_configs_come_out_as_they_did_before_defaults_were_layered(name, tune):
    """Every key the reference configs depend on is set in them: on top of the embedded default
    they give exactly what they gave on the code's defaults alone."""
    from lit_sft.config import DEFAULT_CONFIGS, build_parser

    argv = ["--config", str(ROOT / "configs" / "qwen2.5-math-1.5b" / f"{name}.yaml")]
    alone = _flat(build_parser(tune, default_config=None).parse_args(argv).as_dict())
    layered = _flat(build_parser(tune, default_config=DEFAULT_CONFIGS[tune]).parse_args(argv).as_dict())
    assert {k: v for k, v in layered.items() if alone.get(k) != v} == {}
