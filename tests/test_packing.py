"""Packed and padded batches give the same per-token logits, loss and gradients on a tiny Qwen2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_sft.loss import token_nll_sum
from lit_sft.packing import IGNORE_INDEX, model_inputs, pack_collate, pad_collate

VOCAB = 128
PAD_ID = 0


def _example(prompt: list[int], response: list[int]) -> dict[str, list[int]]:
    return {
        "input_ids": prompt + response,
        "labels": [IGNORE_INDEX] * len(prompt) + response,
    }


def _random_examples(seed: int, n: int = 4) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p_len, r_len = (int(x) for x in torch.randint(2, 12, (2,), generator=gen))
        tokens = torch.randint(1, VOCAB, (p_len + r_len,), generator=gen).tolist()
        out.append(_example(tokens[:p_len], tokens[p_len:]))
    return out


def _tiny_qwen2(attn_implementation: str, tie_word_embeddings: bool = False) -> torch.nn.Module:
    # Built in code (not the tiny.py fixture) so this test depends on nothing but transformers.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
        tie_word_embeddings=tie_word_embeddings,
    )
    model = Qwen2ForCausalLM(config).float().eval()
    assert model.config._attn_implementation == attn_implementation
    return model


# ---- collate structure -------------------------------------------------------------------


def test_pad_collate_right_pads_and_masks_padding() -> None:
    examples = [_example([5, 6], [7, 8, 9]), _example([10], [11])]
    batch = pad_collate(examples, pad_id=PAD_ID, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [10, 11, 0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 2 + [0] * 6]
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [[m, m, 7, 8, 9, m, m, m], [m, 11, m, m, m, m, m, m]]
    assert batch["num_examples"] == 2
    assert batch["num_target_tokens"] == 4


def test_pack_collate_restarts_positions_and_masks_each_first_token() -> None:
    # The second example's response starts at its first token: that label is unpredictable
    # (only the previous example precedes it) and must be masked.
    examples = [_example([5, 6], [7, 8]), _example([], [11, 12, 13])]
    batch = pack_collate(examples)
    m = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 11, 12, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[m, m, 7, 8, m, 12, 13]]
    assert "attention_mask" not in batch
    assert batch["num_examples"] == 2
    assert batch["num_target_tokens"] == 4
    assert pad_collate(examples, pad_id=PAD_ID)["num_target_tokens"] == 4


def test_pack_collate_filler_is_its_own_sequence() -> None:
    batch = pack_collate([_example([5], [6, 7])], pad_id=PAD_ID, pad_to_multiple_of=8)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["labels"][0, 3:].eq(IGNORE_INDEX).all()
    assert batch["num_target_tokens"] == 2


@pytest.mark.parametrize("collate", [pad_collate, pack_collate])
def test_collates_reject_malformed_examples(collate) -> None:
    kwargs = {"pad_id": PAD_ID}
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2, 3], "labels": [1, 2]}], **kwargs)
    with pytest.raises(ValueError, match="no tokens"):
        collate([{"input_ids": [], "labels": []}], **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        collate([], **kwargs)


# ---- token_nll_sum ----------------------------------------------------------------------


def test_token_nll_sum_shifts_like_hf_loss() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, VOCAB, generator=gen)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 9, 8, IGNORE_INDEX, IGNORE_INDEX]])
    total, count = token_nll_sum(logits, labels)
    expected = sum(
        -F.log_softmax(logits[b, t - 1], dim=-1)[labels[b, t]]
        for b in range(2)
        for t in range(1, 5)
        if labels[b, t] != IGNORE_INDEX
    )
    assert count == 5
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)


def test_token_nll_sum_without_targets_is_zero_and_differentiable() -> None:
    logits = torch.randn(1, 3, VOCAB, requires_grad=True)
    total, count = token_nll_sum(logits, torch.full((1, 3), IGNORE_INDEX))
    total.backward()
    assert count == 0 and total.item() == 0.0
    assert logits.grad is not None and logits.grad.abs().sum() == 0


def test_token_nll_sum_matches_model_builtin_mean_loss() -> None:
    model = _tiny_qwen2("sdpa")
    batch = pad_collate(_random_examples(seed=2), pad_id=PAD_ID)
    with torch.no_grad():
        out = model(**model_inputs(batch), labels=batch["labels"])
    total, count = token_nll_sum(out.logits, batch["labels"])
    assert count == batch["num_target_tokens"]
    torch.testing.assert_close(total / count, out.loss, rtol=1e-5, atol=1e-5)


# ---- packed == padded on a real model ----------------------------------------------------


def _per_example_logits_padded(logits: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return [logits[row, :n] for row, n in enumerate(lengths)]


def _per_example_logits_packed(logits: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(logits[0], lengths))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_matches_padded_logits_and_loss(attn_implementation: str) -> None:
    model = _tiny_qwen2(attn_implementation)
    examples = _random_examples(seed=3)
    lengths = [len(ex["input_ids"]) for ex in examples]
    padded = pad_collate(examples, pad_id=PAD_ID)
    packed = pack_collate(examples, pad_id=PAD_ID)
    with torch.no_grad():
        pad_logits = model(**model_inputs(padded)).logits
        pack_logits = model(**model_inputs(packed)).logits
        alone = [model(input_ids=torch.tensor([ex["input_ids"]])).logits[0] for ex in examples]

    for ref, pad_l, pack_l in zip(
        alone,
        _per_example_logits_padded(pad_logits, lengths),
        _per_example_logits_packed(pack_logits, lengths),
    ):
        torch.testing.assert_close(pad_l, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pack_l, ref, rtol=1e-5, atol=1e-5)

    pad_sum, pad_count = token_nll_sum(pad_logits, padded["labels"])
    pack_sum, pack_count = token_nll_sum(pack_logits, packed["labels"])
    assert pad_count == pack_count == padded["num_target_tokens"] == packed["num_target_tokens"]
    torch.testing.assert_close(pack_sum / pack_count, pad_sum / pad_count, rtol=1e-5, atol=1e-5)


def _second_example_gap(model: torch.nn.Module, **forward: object) -> float:
    """Max |logit| gap between the packed row's second example and that example run alone."""
    examples = _random_examples(seed=3)
    first_len = len(examples[0]["input_ids"])
    packed = pack_collate(examples)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], **forward).logits[0]
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]]), use_cache=False).logits[0]
    return float((logits[first_len : first_len + alone.shape[0]] - alone).abs().max())


def test_packing_without_restarted_positions_leaks_across_examples() -> None:
    """The control for the test above: it would catch attention across example boundaries."""
    assert _second_example_gap(_tiny_qwen2("sdpa"), use_cache=False) > 1e-3


@pytest.mark.parametrize("train_mode", [False, True])
def test_packing_needs_use_cache_false(train_mode: bool) -> None:
    """Pins the transformers behaviour model_inputs guards against: with the default cache on,
    even in train mode, position_ids alone no longer separate the packed examples."""
    model = _tiny_qwen2("sdpa").train(train_mode)
    position_ids = pack_collate(_random_examples(seed=3))["position_ids"]
    assert _second_example_gap(model, position_ids=position_ids, use_cache=False) < 1e-5
    assert _second_example_gap(model, position_ids=position_ids) > 1e-3


def test_packed_and_padded_gradients_match() -> None:
    model = _tiny_qwen2("sdpa")
    examples = _random_examples(seed=4, n=3)

    def grads(batch: dict) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        total, count = token_nll_sum(model(**model_inputs(batch)).logits, batch["labels"])
        (total / count).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    pad_grads = grads(pad_collate(examples, pad_id=PAD_ID))
    pack_grads = grads(pack_collate(examples, pad_id=PAD_ID, pad_to_multiple_of=16))
    assert pad_grads.keys() == pack_grads.keys() and pad_grads
    for name in pad_grads:
        torch.testing.assert_close(pack_grads[name], pad_grads[name], rtol=1e-4, atol=1e-6, msg=name)
