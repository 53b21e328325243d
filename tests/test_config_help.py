"""--help gives every key a user sets one true sentence; a misspelt key names its file, line and the key meant."""

from __future__ import annotations

from pathlib import Path

import pytest

import train as train_cli
import tune as tune_cli
from lit_sft.cli import run_cli
from lit_sft.config import TRAINER_DEFAULTS, build_parser, parse
from lit_sft.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GROUP_HELP = "Path to a configuration file."
"""What jsonargparse says of a section's own option (`--model CONFIG`): true, but about no key."""


def _help_by_key(tune: bool = True) -> dict[str, str]:
    parser = build_parser(tune)
    return {a.dest: " ".join((a.help or "").split()) for a in parser._actions
            if a.dest not in ("help", "config", "print_config") and not a.dest.endswith(".help")}


def test_every_key_has_a_sentence_of_its_own():
    helps = _help_by_key()
    sections = {k.rsplit(".", 1)[0] for k in helps if "." in k}
    missing = sorted(k for k, text in helps.items() if k not in sections and (not text or text == GROUP_HELP))
    assert missing == []
    for key in ("wandb.enabled", "wandb.project", "wandb.save_dir", "wandb.entity", "wandb.group", "wandb.name", "wandb.tags",
                "early_stopping.enabled", "early_stopping.monitor", "early_stopping.mode", "early_stopping.min_delta",
                "study.direction", "study.plots", "study.pruner.enabled"):
        assert helps[key].endswith((".", ")")), (key, helps[key])


def test_trainer_help_speaks_of_optimizer_steps_and_not_of_lightnings_defaults():
    helps = _help_by_key(tune=False)
    assert "optimizer steps" in helps["trainer.val_check_interval"] and "training batches" not in helps["trainer.val_check_interval"]
    assert "optimizer steps" in helps["trainer.max_steps"].lower() and "budget.examples" in helps["trainer.max_steps"]
    # --help prints the default that runs after each text; Lightning's own ("Default: ``50``") contradicted ours.
    stale = sorted(k for k, text in helps.items() if k.startswith("trainer.") and ("Default:" in text or "by default (" in text))
    assert stale == []
    for key in TRAINER_DEFAULTS:
        assert helps[key], key


def test_tune_help_shows_the_sentences(capsys):
    with pytest.raises(SystemExit):
        tune_cli.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("W&B project the runs belong to.", "Smallest change of `monitor` that counts as an improvement.",
                 "Whether a lower `metric` is better", "Draw the PNG plots", "Prune: stop a trial at a rung",
                 "every this many optimizer steps"):
        assert text in out, text


def test_a_misspelt_key_in_a_config_file_names_the_file_the_line_and_the_key_meant(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  learning_rat: 1.0e-3\ntrainer:\n  max_steps: 3\n  strategy: auto\nwandb:\n  tags: [a]\n")
    assert run_cli(train_cli.main, ["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}, line 2: model.learning_rat is not a config key; did you mean model.learning_rate?"


def test_every_unknown_key_is_named_at_once_and_the_command_line_gets_a_suggestion(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  batchsize: 8\nstudy:\n  pruner:\n    enabeld: false\n")
    with pytest.raises(UserError) as err:
        parse(["--config", str(config), "--stdy.n_trials", "3"], tune=True)
    message = str(err.value)
    assert f"{config}, line 2: data.batchsize is not a config key; did you mean data.batch_size?" in message
    assert f"{config}, line 5: study.pruner.enabeld is not a config key; did you mean study.pruner.enabled?" in message
    assert "--stdy.n_trials is not a config key; did you mean --study.n_trials?" in message
