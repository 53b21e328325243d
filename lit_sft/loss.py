"""The SFT loss: summed next-token NLL over response tokens, with logits only where they count.

A causal LM's logits are [rows, T, V]; with Qwen's 151,936-word vocabulary they are the largest
activation of a step, yet only response positions enter the loss. For architectures whose logits
are exactly `lm_head(last hidden state)` (`HEAD_AT_TARGETS_ONLY`), `causal_lm_nll_sum` runs the
decoder, keeps the hidden states of target positions, and applies the head to those alone: no
logits for prompt or padding positions, in the forward pass or the backward one. Every other
model goes through its own forward and `token_nll_sum`, which gives the same value.

Label convention (see lit_sft.packing): `labels[i]` is the target predicted from position i - 1,
so both paths shift labels left by one, as HF's ForCausalLMLoss does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_sft.kernels import fused_loss_on, liger_head_nll_sum, packed_forward
from lit_sft.packing import IGNORE_INDEX, model_inputs

HEAD_AT_TARGETS_ONLY = frozenset({"qwen2", "qwen3", "llama", "mistral"})
"""model_type values whose forward is `lm_head(base_model(...))` with nothing after the head (no
logit scaling or soft-capping, unlike e.g. gemma2 or cohere), so the head may be applied to a
subset of positions."""


def _targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of positions (of the first T-1) that predict a target, and those targets."""
    shift_labels = labels[..., 1:]
    mask = shift_labels != IGNORE_INDEX
    return mask, shift_labels[mask]


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over target tokens, and their count, from full logits [..., T, V].

    Only target positions are gathered before the float32 upcast: with a 150k vocabulary the
    full upcast logits would dominate activation memory. The boolean selection syncs with the
    device once per call; the count is then free.
    """
    mask, targets = _targets(labels)
    picked = logits[..., :-1, :][mask]
    if picked.shape[0] == 0:
        # A zero that still depends on the logits, so backward works on an all-prompt batch.
        return logits.sum().float() * 0.0, 0
    return F.cross_entropy(picked.float(), targets, reduction="sum"), int(picked.shape[0])


def head_nll_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, *, fused: bool = False) -> tuple[torch.Tensor, int]:
    """`token_nll_sum(head(hidden), labels)`, applying the head to target positions only.

    `fused`: the head and cross-entropy as Liger's fused linear cross-entropy (lit_sft.kernels),
    which does not hold even the target rows' logits at once; same value, Liger installed.
    """
    mask, targets = _targets(labels)
    picked = hidden[..., :-1, :][mask]
    if picked.shape[0] == 0:
        # Through the head too, so every parameter gets a (zero) gradient, as DDP expects.
        return head(hidden[..., :1, :]).float().sum() * 0.0, 0
    if fused:
        return liger_head_nll_sum(picked, head, targets), int(picked.shape[0])
    return F.cross_entropy(head(picked).float(), targets, reduction="sum"), int(picked.shape[0])


def head_at_targets_only(model: nn.Module) -> bool:
    """Whether `causal_lm_nll_sum` may skip the logits of non-target positions for this model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in HEAD_AT_TARGETS_ONLY and model.get_output_embeddings() is not None


def causal_lm_nll_sum(model: nn.Module, batch: Mapping[str, Any], *, targets_only: bool | None = None) -> tuple[torch.Tensor, int]:
    """Summed NLL over a collated batch's target tokens, and their count.

    `targets_only`: None = wherever the architecture allows (`head_at_targets_only`); False
    forces the model's own full-logits forward (the reference the tests compare against). The
    attention and kernels set by `lit_sft.kernels.configure` apply on either path; Liger's fused
    cross-entropy only on the targets-only one.
    """
    inputs = model_inputs(batch)
    if targets_only is None:
        targets_only = head_at_targets_only(model)
    with packed_forward(model, inputs):
        if targets_only:
            hidden = model.base_model(**inputs).last_hidden_state
            return head_nll_sum(hidden, model.get_output_embeddings(), batch["labels"], fused=fused_loss_on(model))
        return token_nll_sum(model(**inputs).logits, batch["labels"])
