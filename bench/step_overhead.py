"""Lightning's training-step time over a plain PyTorch loop's, on the same model and batches.

Both loops run in one process and one `Trainer.fit`, alternating blocks of steps after a
warm-up (bench/common.py: Interleave), so machine drift hits both alike. The plain loop does
what SFTModule.training_step does (token-weighted micro-batch accumulation, clip, AdamW,
schedule) and nothing else. Goal: ratio <= 1.02. The last line printed is `ratio: X`.

    python bench/step_overhead.py                      # embedded tiny model, generated data
    python bench/step_overhead.py --data lengths       # real MATH trace lengths, random ids
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_sft_pairs, measure_step_overhead, records_datamodule, records_from_lengths  # noqa: E402
from lit_sft.data import SFTDataModule  # noqa: E402
from lit_sft.module import SFTModule  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder; default: the embedded tiny model")
    p.add_argument("--data", choices=("generated", "lengths"), default="generated",
                   help="generated: SFTDataModule's embedded task; lengths: bench/sft_lengths.json with random ids")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=15, help="Lightning/plain block pairs")
    p.add_argument("--block", type=int, default=4, help="optimizer steps per block")
    p.add_argument("--progress-bar", action="store_true", help="measure with Lightning's progress bar on")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 keeps timings stable when other processes share the cores")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p.parse_args(argv)


def build_data(args: argparse.Namespace, module: SFTModule) -> SFTDataModule:
    common = {"batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size, "max_length": args.max_length, "packing": args.packing}
    if args.data == "generated":
        return SFTDataModule(tokenizer_name_or_path=module.model_path, num_generated=4000, eval_size=16, **common)
    records = records_from_lengths(load_sft_pairs(), vocab_size=module.model.config.vocab_size, max_length=args.max_length)
    return records_datamodule(records, pad_id=0, **common)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = SFTModule(model_name_or_path=args.model, learning_rate=1e-4)
    data = build_data(args, module)
    trainer_kwargs: dict[str, Any] = {"accelerator": args.accelerator, "enable_progress_bar": args.progress_bar}
    result = measure_step_overhead(module, data, trainer_kwargs, warmup=args.warmup, rounds=args.rounds, block=args.block)
    details = {
        **result.as_dict(),
        "model": module.model_path,
        "data": args.data,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "packing": args.packing,
        "progress_bar": args.progress_bar,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(details, indent=2))
    print(f"lightning step: {details['lightning_step_ms']:.2f} ms   plain step: {details['plain_step_ms']:.2f} ms   "
          f"ratio of totals: {details['ratio_of_totals']:.4f}")
    print("block ratios: " + " ".join(f"{r:.3f}" for r in details["block_ratios"]))
    print(f"ratio: {result.ratio:.4f}")  # median of block ratios (see OverheadResult.ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
