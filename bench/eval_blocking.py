"""How long does training wait on the evaluator? One short run of the tiny model, evaluator on.

Measures, in one run: the time per evaluation (in the evaluator process), and the fraction of
the fit's wall time the training loop spent inside the CheckpointPoster's hooks (writing and
posting weights, polling, and the bounded final wait). Goal: blocked_fraction <= 0.02.

    python bench/eval_blocking.py [--steps 600] [--every 100] [--num-problems 32]

The evaluator's start-up is paid once per study, before the first trial, so it is waited for
before training starts and reported apart. The last line is `blocked_fraction: X`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder; default: the embedded tiny model")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--every", type=int, default=100, help="validate (and post a checkpoint) every N steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--num-problems", type=int, default=32, help="problems generated and graded per evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--out", default=None, help="work folder; default: a temporary one")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, out: Path) -> dict[str, float]:
    import torch

    from callbacks.checkpoint_poster import CheckpointPoster
    from lit_sft.data import SFTDataModule
    from lit_sft.evaluator import EvaluatorClient, EvaluatorConfig
    from lit_sft.training import train
    from lit_sft.weights import resolve_model_path

    # The evaluator takes half the cores (see EvaluatorClient.start); oversubscribed OpenMP
    # threads would slow training for reasons that have nothing to do with blocking.
    torch.set_num_threads(args.train_threads)
    model_path = resolve_model_path(args.model)
    cfg = {
        "output_dir": str(out / "train"),
        "model": {"model_name_or_path": model_path, "learning_rate": 1e-3},
        "data": {
            "num_generated": max(400, args.batch_size * 50), "batch_size": args.batch_size, "eval_size": 16,
            "num_validation_problems": args.num_problems, "max_length": 256,
        },
        "trainer": {
            "max_steps": args.steps, "val_check_interval": args.every, "accelerator": "cpu",
            "enable_progress_bar": False, "enable_model_summary": False,
        },
        "early_stopping": {"enabled": False},  # a fixed-length run: every checkpoint is posted
        "evaluator": {"enabled": False},  # posted through our own poster below, to time its hooks
        "wandb": {"enabled": False},
    }
    problems = SFTDataModule(**cfg["data"], tokenizer_name_or_path=model_path).validation_problems
    config = EvaluatorConfig(device="cpu", num_problems=args.num_problems, max_new_tokens=args.max_new_tokens, batch_size=16)
    with EvaluatorClient(model_path, problems, config) as client:
        if not client.wait_ready(600):
            raise SystemExit("evaluator did not start within 600 s")
        load_s = client.ready_info["load_seconds"]
        poster = CheckpointPoster(client, "bench", out / "weights", final_wait_s=config.final_wait_s)
        result = train(cfg, callbacks=[poster], run_name="bench")
    evals = poster.results
    ok = [r for r in evals if r["status"] == "ok"]
    seconds = [r["seconds"] for r in ok]
    fit_s = result["seconds"]
    print(f"model: {model_path}")
    print(f"steps: {result['global_step']}, checkpoint every {args.every} steps, batch size {args.batch_size}")
    print(f"evaluator: {client.backend} on {client.device}; start-up {load_s:.2f} s (once per study, not counted)")
    print(f"evaluations: {len(evals)} ({len(ok)} ok), {args.num_problems} problems x {args.max_new_tokens} new tokens")
    if seconds:
        print(f"seconds_per_evaluation: {statistics.mean(seconds):.3f} (min {min(seconds):.3f}, max {max(seconds):.3f})")
    print(f"fit_seconds: {fit_s:.2f}")
    parts = ", ".join(f"{k} {v:.3f}" for k, v in poster.blocked.items())
    print(f"blocked_seconds: {poster.blocked_s:.3f} ({parts})")
    fraction = poster.blocked_s / fit_s
    print(f"blocked_fraction: {fraction:.4f}")
    return {"blocked_fraction": fraction, "fit_seconds": fit_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out:
        run(args, Path(args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="eval-blocking-") as tmp:
            run(args, Path(tmp))
    return 0


if __name__ == "__main__":  # the evaluator is spawned: its process re-imports this file
    raise SystemExit(main())
