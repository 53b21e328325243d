"""Fine-tune once: python train.py fit --config configs/sft.yaml --model.learning_rate 1e-3

Same config format and overrides as tune.py (Lightning's argument parser); the work is
lit_sft.training.train(cfg), which the tuner also calls.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lit_sft.cli import run_cli
from lit_sft.errors import UserError

METRICS_SHOWN = ("eval/loss", "best_step", "eval/accuracy", "eval/format_accuracy", "train/loss", "global_step", "examples_seen", "seconds")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        argv = ["fit", *argv]
    if not argv or argv[0] != "fit":
        raise UserError("usage: python train.py fit [--config configs/sft.yaml] [--model.learning_rate 1e-3 ...] (only 'fit' is supported)")
    from lit_sft.config import parse
    from lit_sft.training import save_pretrained, train

    cfg = parse(argv[1:])
    result = train(cfg, keep_best_weights=True, run_name=cfg["wandb"].get("name"))
    out = save_pretrained(result, Path(cfg["output_dir"]) / "best_model")
    print("\n".join(f"{k:>22}: {result[k]}" for k in METRICS_SHOWN if k in result))
    print(f"{'best model':>22}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
