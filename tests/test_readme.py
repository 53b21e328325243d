"""The README's commands, pasted in order on a fresh copy of the repository, work.

Each `python tune.py` / `python train.py` line runs as written plus overrides that shrink it to
seconds (a study of 2 short trials); everything else runs exactly as written, except installs
(the test environment has the project installed) and optuna-dashboard (a server: its storage URL
is opened the way the dashboard opens it instead).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHRINK_TUNE = [
    "--study.n_trials", "2", "--budget.examples", "800", "--budget.eval_every_examples", "400",
    "--study.pruner.min_resource", "400", "--data.num_validation_problems", "16", "--data.num_test_problems", "16",
    "--evaluator.max_new_tokens", "24", "--trainer.enable_progress_bar", "false",
]
SHRINK_TRAIN = ["--budget.examples", "320", "--budget.eval_every_examples", "160", "--data.num_validation_problems", "16",
                "--trainer.enable_progress_bar", "false"]


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, in order (comments stripped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def fresh_copy(dest: Path) -> Path:
    """What `git clone` gives: the tracked files and the untracked ones git does not ignore."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def _run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(cwd)}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _without_install(command: str) -> str:
    parts = [p.strip() for p in command.split("&&")]
    return " && ".join(p for p in parts if not p.startswith("pip install"))


@pytest.mark.slow
def test_the_readme_commands_work_in_order_on_a_fresh_clone(tmp_path):
    clone = fresh_copy(tmp_path / "clone")
    commands = readme_commands()
    assert commands[:2] == ['pip install -e . && python tune.py', 'pip install -e ".[dev]" && python -m pytest']
    ran = []
    del commands[1]  # the test command: it is what runs this test
    for command in commands:
        command = _without_install(command)
        if command.startswith("optuna-dashboard "):
            url = command.split()[1]
            if not url.startswith("sqlite:///results/optuna/"):
                continue  # another study's storage (the Qwen reference), not made by these commands
            assert optuna.get_all_study_names(storage=url.replace("sqlite:///", f"sqlite:///{clone}/"))
        elif command.startswith("python tune.py"):
            _run(f"{command} {' '.join(SHRINK_TUNE)}", clone)
        elif command.startswith("python train.py"):
            _run(f"{command} {' '.join(SHRINK_TRAIN)}", clone)
        elif command.startswith("wandb sync"):
            out = _run(command.replace("wandb sync", "wandb sync --dry-run", 1), clone)
            assert "No runs to sync" not in out.stdout + out.stderr
            assert "offline-run-" in out.stdout + out.stderr
        elif command.startswith(("cat ", "ls ")):
            assert _run(command, clone).stdout.strip()
        else:
            continue
        ran.append(command.split()[0:2])
    # The README has a dashboard command for the Quickstart's own study, not only for another one.
    assert ["optuna-dashboard", "sqlite:///results/optuna/tiny-math/optuna.db"] in ran
    assert ["python", "tune.py"] in ran and ["python", "train.py"] in ran and ["wandb", "sync"] in ran
    # The first pasted command is the Quickstart's study; its results are where the README says.
    # Each study in a folder of its own: the accuracy study left the Quickstart's report and model alone.
    quickstart = clone / "results/optuna/tiny-math"
    assert (quickstart / "REPORT.md").is_file() and (quickstart / "best_model/config.json").is_file()
    assert yaml.safe_load((quickstart / "study_results.yaml").read_text())["study"] == "tiny-math"
    accuracy = clone / "results/optuna/tiny-math-accuracy"
    assert yaml.safe_load((accuracy / "study_results.yaml").read_text())["study"] == "tiny-math-accuracy"
    assert (clone / "results/train/run-000/best_model/config.json").is_file()
    # The README's Python: the best model, prompted as it was trained, answers (its own words:
    # this shrunk study's model is not the Quickstart's).
    for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S):
        assert _run(f"python - <<'EOF'\n{block}EOF", clone).stdout.strip()
