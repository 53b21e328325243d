"""What finished trials leave on disk, and how much the study keeps."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna

from lit_sft.study import report


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def remove_leftovers(study: optuna.Study, results_dir: Path) -> None:
    """Delete what finished trials no longer need: evaluator weight files and best-model staging
    folders that a killed worker left behind (a live trial cleans up its own)."""
    finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    for number in finished:
        shutil.rmtree(report.trial_dir(results_dir, study.study_name, number) / "weights", ignore_errors=True)
        for kind in ("trial", "old"):
            shutil.rmtree(results_dir / f".{report.BEST_MODEL_DIR}.{kind}-{number:04d}", ignore_errors=True)


def disk_usage(study_name: str, results_dir: Path) -> dict[str, int]:
    """Bytes the study keeps on this machine; weight files should be 0 once no trial runs."""
    trials = results_dir / "trials" / study_name
    return {
        "results_dir_bytes": _size(results_dir),
        "best_model_bytes": _size(results_dir / report.BEST_MODEL_DIR),
        "weight_files_bytes": sum(_size(d) for d in trials.glob("trial-*/weights")),
        "storage_bytes": sum(_size(p) for p in results_dir.glob("optuna.db*")),
    }


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


