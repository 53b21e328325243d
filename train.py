"""Fine-tune once: python train.py fit [--config configs/sft.yaml] --model.learning_rate 1e-3

Same config format and overrides as tune.py (Lightning's argument parser); without --config the
embedded default (configs/sft.yaml) runs. Each run writes to a folder of its own under
`output_dir` (run-000, run-001, ... or `<wandb.name>-000`), which is also its W&B run name, in
the W&B group `train`. The work is lit_sft.training.train(cfg), which the tuner also calls.
"""

from __future__ import annotations

import sys

from lit_sft.cli import run_cli
from lit_sft.errors import UserError

METRICS_SHOWN = ("eval/loss", "best_step", "eval/accuracy", "eval/format_accuracy", "train/loss", "global_step", "examples_seen", "seconds")


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        argv = ["fit", *argv]
    if not argv or argv[0] != "fit":
        raise UserError("usage: python train.py fit [--config configs/sft.yaml] [--model.learning_rate 1e-3 ...] (only 'fit' is supported)")
    from lit_sft.config import parse
    from lit_sft.training import new_run_dir, save_pretrained, train

    cfg = parse(argv[1:])
    run_dir = new_run_dir(cfg["output_dir"], cfg["wandb"].get("name") or "run")
    cfg["output_dir"] = str(run_dir)
    cfg["wandb"]["group"] = cfg["wandb"].get("group") or "train"
    print(f"{'run folder':>22}: {run_dir}")
    result = train(cfg, keep_best_weights=True, run_name=run_dir.name)
    print("\n".join(f"{k:>22}: {result[k]}" for k in METRICS_SHOWN if k in result))
    if result["best_step"] is None:
        print(f"error: no evaluation ran in {result['global_step']} steps, so there is no best model; "
              f"lower trainer.val_check_interval (or budget.eval_every_examples)", file=sys.stderr)
        return 1
    out = save_pretrained(result, run_dir / "best_model")
    print(f"{'best model':>22}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
