"""The loss with logits at target positions only equals the full-logits loss, value and gradients."""

from __future__ import annotations

import pytest
import torch

from lit_sft.loss import causal_lm_nll_sum, head_at_targets_only, head_nll_sum, token_nll_sum
from lit_sft.packing import IGNORE_INDEX, pack_collate, pad_collate
from tests.test_packing import VOCAB, _random_examples, _tiny_qwen2


def _qwen2(tied: bool) -> torch.nn.Module:
    return _tiny_qwen2("sdpa", tie_word_embeddings=tied)


def _loss_and_grads(model: torch.nn.Module, batch: dict, targets_only: bool) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total, count = causal_lm_nll_sum(model, batch, targets_only=targets_only)
    total.backward()
    return total.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_targets_only_equals_full_logits(tied: bool, collate: str) -> None:
    model = _qwen2(tied)
    examples = _random_examples(seed=1)
    batch = pad_collate(examples, pad_id=0) if collate == "padded" else pack_collate(examples, pad_id=0)
    full, full_count, full_grads = _loss_and_grads(model, batch, targets_only=False)
    fast, fast_count, fast_grads = _loss_and_grads(model, batch, targets_only=True)
    assert fast_count == full_count == batch["num_target_tokens"] > 0
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    # Tied weights are one parameter, listed once as the embedding.
    assert fast_grads.keys() == full_grads.keys() and ("lm_head.weight" in fast_grads) != tied
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_qwen2_takes_the_targets_only_path_by_default() -> None:
    model = _qwen2(tied=True)
    calls = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape))
    batch = pad_collate(_random_examples(seed=2), pad_id=0)
    causal_lm_nll_sum(model, batch)
    # The head saw one row per target token, not rows x padded length.
    assert head_at_targets_only(model)
    assert calls == [torch.Size([batch["num_target_tokens"], 64])]


def test_other_architectures_keep_their_own_forward() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2)).float().eval()
    batch = pad_collate(_random_examples(seed=3), pad_id=0)
    assert not head_at_targets_only(model)
    total, count = causal_lm_nll_sum(model, batch)
    with torch.no_grad():
        expected, expected_count = token_nll_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert count == expected_count
    torch.testing.assert_close(total.detach(), expected, rtol=1e-5, atol=1e-5)


def test_no_targets_gives_a_differentiable_zero_reaching_every_parameter() -> None:
    model = _qwen2(tied=False)
    batch = pad_collate([{"input_ids": [3, 4, 5], "labels": [IGNORE_INDEX] * 3}], pad_id=0)
    total, count = causal_lm_nll_sum(model, batch)
    total.backward()
    assert count == 0 and total.item() == 0.0
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["lm_head.weight"] is not None and all(g is None or g.abs().sum() == 0 for g in grads.values())


def test_head_nll_sum_is_token_nll_sum_of_the_heads_logits() -> None:
    gen = torch.Generator().manual_seed(4)
    hidden, head = torch.randn(2, 6, 8, generator=gen), torch.nn.Linear(8, VOCAB, bias=False)
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    with torch.no_grad():
        assert head_nll_sum(hidden, head, labels)[1] == token_nll_sum(head(hidden), labels)[1] == 6
        torch.testing.assert_close(head_nll_sum(hidden, head, labels)[0], token_nll_sum(head(hidden), labels)[0])


def test_a_single_target_token_is_counted_and_scored() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 5, VOCAB)
    labels = torch.full((1, 5), IGNORE_INDEX)
    labels[0, 3] = 7  # predicted by position 2
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3], torch.tensor([7]), reduction="sum")
    total, count = token_nll_sum(logits, labels)
    assert count == 1 and torch.allclose(total, expected) and total > 0
    head = torch.nn.Linear(16, VOCAB)
    hidden = torch.randn(1, 5, 16)
    total, count = head_nll_sum(hidden, head, labels)
    assert count == 1 and torch.allclose(total, torch.nn.functional.cross_entropy(head(hidden[0, 2:3]), torch.tensor([7]), reduction="sum"))
