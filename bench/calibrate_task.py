"""Calibrate the embedded task: accuracy after ~1 minute of CPU training, per learning rate.

A plain PyTorch loop, on purpose free of Lightning and of the rest of lit-sft, so the numbers say
what the task and the model size allow, not what the trainer costs: AdamW with SFTModule's recipe
(betas 0.9/0.95, 5% warmup, cosine to 10%, clipping at 1.0), loss on response tokens only (prompt
labels -100), right padding; then greedy generation (left padding) on held-out problems and exact
match of the answer between <answer> and </answer> after </think>.

A cosine schedule needs its length up front, so a short probe first times the training step and
the budget becomes the number of steps that fit it (--steps sets it outright instead).

    python bench/calibrate_task.py                          # default lrs, ~60 s of training each
    python bench/calibrate_task.py --lrs 1e-3 3e-3 --budget-s 30 --layers 2 --hidden 128

Each learning rate starts from the same initial weights and sees the same batches. One row of the
table per learning rate; with --json the rows are also written as JSON (one object a line).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_sft.synthetic import make_problems, make_sft_records
from lit_sft.tiny import DEFAULT_HIDDEN, DEFAULT_LAYERS, build_tiny_model

IGNORE = -100
ANSWER = re.compile(r"</think>.*?<answer>(.*?)</answer>", re.DOTALL)


@dataclass
class Row:
    """One learning rate's result."""

    lr: float
    layers: int
    hidden: int
    params: int
    steps: int
    seconds: float
    """Wall time of the training steps alone (no data preparation, no evaluation)."""
    steps_per_s: float
    final_loss: float
    """Mean training loss over the last 20 steps (per response token)."""
    accuracy: float
    """Share of held-out problems whose generated answer matches exactly."""
    format_ok: float
    """Share of generations with an <answer> after </think>, right or wrong."""
    eval_seconds: float
    mean_tokens: float
    """Mean prompt+response+eos length of the training examples, in tokens."""


def encode_records(tokenizer, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of n generated records: prompt and response tokenized apart."""
    records = make_sft_records(n, seed)
    prompts = tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r["response"] for r in records], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id]
    return [(p + r + eos, [IGNORE] * len(p) + r + eos) for p, r in zip(prompts, responses)]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding; padded positions are masked out of attention and loss."""
    width = max(len(ids) for ids, _ in batch)
    ids = [x + [pad_id] * (width - len(x)) for x, _ in batch]
    labels = [y + [IGNORE] * (width - len(y)) for _, y in batch]
    mask = [[1] * len(x) + [0] * (width - len(x)) for x, _ in batch]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


@dataclass(frozen=True)
class Recipe:
    """The optimizer recipe; defaults are SFTModule's (configs/tune.yaml)."""

    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    """cosine | constant (after the linear warmup)."""
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    weight_decay: float = 0.0


def lr_factor(recipe: Recipe, total: int):
    """The schedule SFTModule uses (warmup, then decay to min_lr_ratio)."""
    from lit_sft.module import lr_lambda

    return lr_lambda(total, recipe.warmup_ratio, recipe.schedule, recipe.min_lr_ratio)


def train(model, batches: list[dict[str, torch.Tensor]], lr: float, recipe: Recipe, log_every: int = 0) -> tuple[float, float]:
    """One optimizer step per batch; returns (seconds, mean loss of the last 20 steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, len(batches)))
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and len(losses) % log_every == 0:
            print(f"  lr {lr:g} step {len(losses)} {time.perf_counter() - start:.1f}s loss {losses[-1]:.4f}", flush=True)
    tail = losses[-20:]
    return time.perf_counter() - start, sum(tail) / len(tail)


def steps_per_second(model, batches: list[dict[str, torch.Tensor]], probe: int = 20) -> float:
    """Training speed measured on a throwaway copy; the first steps (allocation) are not counted."""
    scratch = copy.deepcopy(model)
    train(scratch, batches[:5], 0.0, Recipe())
    seconds, _ = train(scratch, batches[5 : 5 + probe], 0.0, Recipe())
    return probe / seconds


@torch.no_grad()
def accuracy(model, tokenizer, problems: list[dict], prompts: list[str], max_new_tokens: int) -> tuple[float, float]:
    """(exact-match accuracy, format rate) of greedy answers, all problems in one left-padded batch."""
    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    found = [ANSWER.search(text) for text in texts]
    correct = sum(m is not None and m.group(1).strip() == p["answer"] for m, p in zip(found, problems))
    return correct / len(problems), sum(m is not None for m in found) / len(problems)


def run(args: argparse.Namespace) -> list[Row]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_sft.formats import r1_zero_prompt

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="calibrate-"))
    build_tiny_model(folder, num_hidden_layers=args.layers, hidden_size=args.hidden, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Enough batches for the fastest plausible run; only the ones trained on are timed.
    examples = encode_records(tokenizer, args.max_steps * args.batch_size, seed=args.seed)
    batches = [collate(examples[i : i + args.batch_size], tokenizer.pad_token_id) for i in range(0, len(examples), args.batch_size)]
    mean_tokens = sum(len(ids) for ids, _ in examples) / len(examples)
    problems = make_problems(args.num_problems, seed=args.seed + 1)
    prompts = [r1_zero_prompt(p["problem"]) for p in problems]
    recipe = Recipe(schedule=args.schedule, weight_decay=args.weight_decay)
    first = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    steps = args.steps or max(1, int(args.budget_s * steps_per_second(first, batches)))
    if steps > len(batches):
        raise SystemExit(f"{steps} steps fit the budget but only {len(batches)} batches are prepared: raise --max-steps")
    rows = []
    for lr in args.lrs:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        seconds, loss = train(model, batches[:steps], lr, recipe, args.log_every)
        start = time.perf_counter()
        acc, fmt = accuracy(model, tokenizer, problems, prompts, args.max_new_tokens)
        rows.append(
            Row(
                lr=lr, layers=args.layers, hidden=args.hidden, params=sum(p.numel() for p in model.parameters()),
                steps=steps, seconds=round(seconds, 1), steps_per_s=round(steps / seconds, 2),
                final_loss=round(loss, 4) if math.isfinite(loss) else loss, accuracy=acc, format_ok=fmt,
                eval_seconds=round(time.perf_counter() - start, 1), mean_tokens=round(mean_tokens, 1),
            )
        )
        print_row(rows[-1], header=len(rows) == 1)
    return rows


def print_row(row: Row, header: bool) -> None:
    names = list(asdict(row))
    if header:
        print("| " + " | ".join(names) + " |")
        print("|" + "---|" * len(names))
    print("| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in asdict(row).values()) + " |", flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
    parser.add_argument("--budget-s", type=float, default=60.0,
                        help="training time per learning rate: the steps that fit it, timed by a probe first")
    parser.add_argument("--steps", type=int, help="train exactly this many steps instead of --budget-s")
    parser.add_argument("--max-steps", type=int, default=4000, help="batches prepared (a cap on the steps)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS)
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN)
    parser.add_argument("--num-problems", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=0, help="print the training loss every N steps")
    parser.add_argument("--json", type=Path, help="also append the rows here as JSON lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    rows = run(args)
    if args.json:
        with args.json.open("a") as out:
            out.writelines(json.dumps(asdict(row)) + "\n" for row in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
