"""Collate tokenized SFT examples into model inputs: right-padded rows, or one packed row.

An example is a dict with `input_ids` and `labels` (same length; labels are -100 on prompt
tokens). Both collates return `num_examples` and `num_target_tokens` beside the tensors so a
step split into micro-batches can weight each one by its exact share of the step's targets.

Label convention: `labels[i]` is the target predicted from position `i - 1` (HF shifts inside
its loss, and lit_sft.loss does the same). Nothing precedes an example's first token, so
both collates set each example's first label to -100. That is what keeps a packed row from
training token 0 of one example on the last token of the one before it, and it makes
`num_target_tokens` exactly the count lit_sft.loss returns.

Packed rows carry `position_ids` restarting at 0 at each example, no `attention_mask`, and the
sequence boundaries in FlashAttention's varlen form: `cu_seq_lens_q`/`_k` (int32 [0, l0, l0+l1,
..., T], the filler segment included) and `max_length_q`/`_k` (a Python int, so no kernel has to
read it back from the device).
transformers (5.x, `masking_utils._preprocess_mask_arguments`) then detects the packing from the
position ids (`find_packed_sequence_indices`: a new sequence wherever consecutive positions do
not step by 1) and masks attention block-diagonally:
- "sdpa" and "eager": a dense [1, 1, T, T] causal-and-same-sequence mask is materialized, so
  results are exact on CPU and GPU; on GPU the explicit mask rules out SDPA's flash kernel (it
  falls back to the memory-efficient one, which still computes every T x T block) and costs
  T*T bytes of mask. Measured on an H200 (bench/gpu.py, Qwen2.5-1.5B shape, MATH trace
  lengths): packing 32 examples per row was 22% slower than padding them, so with sdpa packing
  saves memory, not time.
- "flex_attention": the same mask as a sparse BlockMask (GPU; needs torch.compile to be fast).
- "flash_attention_2/3": varlen kernels over the `cu_seq_lens_q` the collate passes.
- lit_sft.kernels' "varlen" (`model.attention`): torch's FlashAttention varlen kernel over
  `cu_seq_lens_q`, with no mask built at all; what makes packing pay on a GPU.
This holds only without a KV cache: call the model with use_cache=False (`model_inputs` does),
because a cache, which Qwen2 builds by default even in train mode, turns the detection off.
Verified on CPU for sdpa and eager by tests/test_packing.py (packed logits equal each example
run alone; without use_cache=False they do not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def _as_long(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.long).reshape(-1)


def _example_tensors(example: Mapping[str, Any], index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of one example, labels with the unpredictable first token masked."""
    input_ids = _as_long(example["input_ids"])
    labels = _as_long(example["labels"]).clone()
    if input_ids.numel() == 0:
        raise ValueError(f"example {index} has no tokens")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"example {index}: {labels.numel()} labels for {input_ids.numel()} input ids"
        )
    labels[0] = IGNORE_INDEX
    return input_ids, labels


def _round_up(length: int, multiple: int | None) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


def _count_targets(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def pad_collate(
    examples: Sequence[Mapping[str, Any]], pad_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """Right-padded batch [B, L]: input_ids, attention_mask, labels (-100 on padding).

    `pad_to_multiple_of` rounds L up, which keeps the set of shapes small (tensor-core tiles,
    fewer torch.compile recompiles).
    """
    if not examples:
        raise ValueError("pad_collate needs at least one example")
    pairs = [_example_tensors(ex, i) for i, ex in enumerate(examples)]
    length = _round_up(max(ids.numel() for ids, _ in pairs), pad_to_multiple_of)
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(pairs):
        n = ids.numel()
        input_ids[row, :n] = ids
        attention_mask[row, :n] = 1
        labels[row, :n] = labs
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "num_examples": len(pairs),
        "num_target_tokens": _count_targets(labels),
    }


def pack_collate(
    examples: Sequence[Mapping[str, Any]], pad_id: int = 0, pad_to_multiple_of: int | None = None
) -> dict[str, Any]:
    """All examples concatenated into one row [1, T] with per-example position_ids.

    No attention_mask: its absence is what lets transformers infer the block-diagonal mask from
    position_ids (see the module docstring). `pad_to_multiple_of` appends a filler segment whose
    positions restart at 0, so it is a separate sequence nobody attends to, with labels -100.
    """
    if not examples:
        raise ValueError("pack_collate needs at least one example")
    pairs = [_example_tensors(ex, i) for i, ex in enumerate(examples)]
    ids = [p[0] for p in pairs]
    labs = [p[1] for p in pairs]
    pos = [torch.arange(p.numel(), dtype=torch.long) for p in ids]
    total = sum(p.numel() for p in ids)
    filler = _round_up(total, pad_to_multiple_of) - total
    if filler:
        ids.append(torch.full((filler,), pad_id, dtype=torch.long))
        labs.append(torch.full((filler,), IGNORE_INDEX, dtype=torch.long))
        pos.append(torch.arange(filler, dtype=torch.long))
    labels = torch.cat(labs).unsqueeze(0)
    lengths = [p.numel() for p in ids]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return {
        "input_ids": torch.cat(ids).unsqueeze(0),
        "position_ids": torch.cat(pos).unsqueeze(0),
        "labels": labels,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
        "num_examples": len(pairs),
        "num_target_tokens": _count_targets(labels),
    }


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The forward() arguments for a collated batch: its tensors, and use_cache=False.

    Labels are left out: the loss is lit_sft.loss's summed NLL, not the model's mean loss. A
    packed row's sequence boundaries go along as keyword arguments; only varlen and flash
    attention read them (SDPA and eager ignore them).
    use_cache=False is required, not an optimization: with the config default (True) the
    model builds a DynamicCache even in train mode, and transformers skips packed-sequence
    detection whenever a cache exists, so packed examples silently attend to each other
    (tests/test_packing.py shows both). It also saves storing every layer's keys and values.
    """
    keys = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    inputs: dict[str, Any] = {k: batch[k] for k in keys if k in batch}
    inputs["use_cache"] = False
    return inputs
