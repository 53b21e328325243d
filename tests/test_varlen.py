"""Packed rows on varlen attention: boundaries from the collate, no mask, the padded path's loss.

On CPU the varlen attention runs `reference_varlen_attention` (SDPA per document), so these tests
check everything but FlashAttention's kernel itself: the boundaries, the registration, the
skipped mask, the layouts and grouped-query heads, the fallback rules, and the call into
`varlen_attn` under each signature torch has had. The kernel is compared on a GPU at the end.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import masking_utils

from lit_sft import available, kernels
from lit_sft.errors import UserError
from lit_sft.loss import causal_lm_nll_sum
from lit_sft.packing import pack_collate, pad_collate
from tests.test_packing import _example, _random_examples, _tiny_qwen2


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total, _ = causal_lm_nll_sum(model, batch)
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _qkv(seed: int, total: int, heads: int = 4, kv_heads: int = 2, dim: int = 8) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(total, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))


def _block_diagonal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """The whole row at once under a dense causal-and-same-document mask: the other way to compute it."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(doc.numel())
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    rep = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1), attn_mask=mask
    )
    return out.transpose(0, 1)


# ---- boundaries -------------------------------------------------------------------------------


def test_pack_collate_gives_the_document_boundaries() -> None:
    examples = [_example([5, 6], [7, 8]), _example([9], [11, 12, 13]), _example([1, 2, 3], [4])]
    batch = pack_collate(examples, pad_to_multiple_of=16)
    # Three documents, then the filler up to 16 as a fourth segment of its own.
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 8, 12, 16]
    assert batch["cu_seq_lens_q"].dtype == torch.int32  # FlashAttention's index type
    assert batch["cu_seq_lens_k"].tolist() == batch["cu_seq_lens_q"].tolist()
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    # The boundaries are exactly where the position ids restart.
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == batch["cu_seq_lens_q"][:-1].tolist()
    assert "cu_seq_lens_q" not in pad_collate(examples, pad_id=0)


# ---- the attention function ---------------------------------------------------------------------


def test_reference_varlen_equals_one_dense_block_diagonal_sdpa() -> None:
    lengths = [3, 7, 1, 5]
    q, k, v = _qkv(0, sum(lengths))
    cu = torch.tensor([0, 3, 10, 11, 16], dtype=torch.int32)
    got = kernels.reference_varlen_attention(q, k, v, cu, 7, None)
    torch.testing.assert_close(got, _block_diagonal_sdpa(q, k, v, lengths), rtol=1e-5, atol=1e-6)


def _fake_varlen(signature: str, calls: list[dict]):
    """Stand-ins for torch's varlen_attn as 2.10 and later releases spelled it, computing with the
    reference and recording what they were called with."""

    def compute(q, k, v, cu, max_len, scale, causal):
        assert causal, "called without causal masking"
        return kernels.reference_varlen_attention(q, k, v, cu, max_len, scale)

    if signature == "is_causal":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            calls.append({"is_causal": is_causal, "kv_heads": key.shape[1]})
            assert key.shape[1] == query.shape[1], "no GQA in this signature: heads must be repeated"
            return compute(query, key, value, cu_seq_q, max_q, None, is_causal)
    elif signature == "window":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
            calls.append({"window_size": window_size, "kv_heads": key.shape[1], "scale": scale})
            assert key.shape[1] == query.shape[1]
            return compute(query, key, value, cu_seq_q, max_q, scale, window_size == (-1, 0))
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False):
            calls.append({"window_size": window_size, "kv_heads": key.shape[1], "enable_gqa": enable_gqa, "scale": scale})
            return compute(query, key, value, cu_seq_q, max_q, scale, window_size == (-1, 0))
    return varlen_attn


@pytest.mark.parametrize("signature", ["is_causal", "window", "window+gqa"])
def test_varlen_attn_is_called_causally_under_each_torch_signature(signature: str) -> None:
    lengths = [4, 6]
    q, k, v = _qkv(1, sum(lengths))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    calls: list[dict] = []
    got = kernels.flash_varlen_attention(q, k, v, cu, 6, 8**-0.5, varlen_attn=_fake_varlen(signature, calls))
    torch.testing.assert_close(got, _block_diagonal_sdpa(q, k, v, lengths), rtol=1e-5, atol=1e-6)
    (call,) = calls
    if signature == "is_causal":
        assert call == {"is_causal": True, "kv_heads": 4}
    elif signature == "window":
        assert call == {"window_size": (-1, 0), "kv_heads": 4, "scale": 8**-0.5}
    else:  # the kernel's own GQA: KV heads are not repeated
        assert call == {"window_size": (-1, 0), "kv_heads": 2, "enable_gqa": True, "scale": 8**-0.5}


def test_varlen_attn_without_a_scale_argument_refuses_another_scale() -> None:
    q, k, v = _qkv(2, 5)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="scale"):
        kernels.flash_varlen_attention(q, k, v, cu, 5, 0.5, varlen_attn=_fake_varlen("is_causal", []))


# ---- through the model ----------------------------------------------------------------------------


@pytest.fixture()
def varlen_model():
    model = _tiny_qwen2("sdpa")
    kernels.set_attention(model, "varlen")
    yield model
    kernels.set_attention(model, "sdpa")


def test_packed_varlen_gives_the_padded_loss_and_gradients(varlen_model) -> None:
    examples = _random_examples(seed=5, n=5)
    reference = _tiny_qwen2("sdpa")
    padded_loss, padded_grads = _loss_and_grads(reference, pad_collate(examples, pad_id=0))
    packed_loss, packed_grads = _loss_and_grads(varlen_model, pack_collate(examples, pad_to_multiple_of=8))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_build_no_mask_and_reach_varlen(varlen_model, monkeypatch) -> None:
    seen: list[tuple] = []
    masks: list[object] = []
    original = kernels.varlen_attention
    monkeypatch.setattr(kernels, "varlen_attention", lambda q, k, v, cu, n, s: seen.append((q.shape, k.shape, cu.tolist(), n)) or original(q, k, v, cu, n, s))
    sdpa_mask = masking_utils.sdpa_mask
    monkeypatch.setattr(masking_utils, "sdpa_mask", lambda **kw: masks.append(kw) or sdpa_mask(**kw))
    batch = pack_collate([_example([5, 6], [7, 8]), _example([9], [11, 12])])
    causal_lm_nll_sum(varlen_model, batch)
    assert masks == []  # no [T, T] mask for a row that runs varlen
    # Two layers, each: 4 query heads and 2 KV heads of dimension 16 over the 7 packed tokens.
    assert seen == [(torch.Size([7, 4, 16]), torch.Size([7, 2, 16]), [0, 4, 7], 4)] * 2


def test_without_boundaries_a_packed_row_keeps_the_exact_mask(varlen_model) -> None:
    # A caller that packs but passes no cu_seq_lens (e.g. by hand) must not attend across documents.
    examples = [_example([5, 6], [7, 8]), _example([9], [11, 12])]
    batch = pack_collate(examples)
    reference = _tiny_qwen2("sdpa")
    bare = {k: v for k, v in batch.items() if not k.startswith(("cu_seq", "max_length"))}
    torch.testing.assert_close(causal_lm_nll_sum(varlen_model, bare)[0], causal_lm_nll_sum(reference, batch)[0], rtol=1e-5, atol=1e-5)


def test_padded_batches_on_a_varlen_model_take_sdpa(varlen_model, monkeypatch) -> None:
    monkeypatch.setattr(kernels, "varlen_attention", lambda *a: pytest.fail("a padded batch reached varlen"))
    examples = _random_examples(seed=6)
    reference = _tiny_qwen2("sdpa")
    batch = pad_collate(examples, pad_id=0)
    torch.testing.assert_close(causal_lm_nll_sum(varlen_model, batch)[0], causal_lm_nll_sum(reference, batch)[0], rtol=1e-5, atol=1e-5)


def test_set_attention_back_restores_what_the_model_had() -> None:
    model = _tiny_qwen2("eager")
    kernels.set_attention(model, "varlen")
    assert kernels.uses_varlen(model) and model.model.layers[0].self_attn.config._attn_implementation == kernels.VARLEN
    kernels.set_attention(model, "sdpa")
    assert model.config._attn_implementation == "eager"  # not forced to sdpa


# ---- the rule -----------------------------------------------------------------------------------------


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("choice", "device", "precision", "torch_has_varlen", "expected"),
    [
        ("auto", CPU, "32-true", True, "sdpa"),
        ("auto", CPU, "bf16-mixed", True, "sdpa"),
        ("auto", CUDA, "bf16-mixed", True, "varlen"),
        ("auto", CUDA, "16-mixed", True, "varlen"),
        ("auto", CUDA, "32-true", True, "sdpa"),  # FlashAttention has no fp32 kernel
        ("auto", CUDA, "bf16-mixed", False, "sdpa"),
        ("sdpa", CUDA, "bf16-mixed", True, "sdpa"),
        ("varlen", CPU, "32-true", False, "varlen"),  # the exact reference: what these tests run
        ("varlen", CUDA, "bf16-mixed", True, "varlen"),
    ],
)
def test_attention_rule(monkeypatch, choice, device, precision, torch_has_varlen, expected) -> None:
    monkeypatch.setattr(available, "has_varlen_attn", lambda: torch_has_varlen)
    assert kernels.resolve_attention(choice, _tiny_qwen2("sdpa"), device, precision) == expected


def test_explicit_varlen_without_torch_support_on_cuda_is_a_user_error(monkeypatch) -> None:
    monkeypatch.setattr(available, "has_varlen_attn", lambda: False)
    with pytest.raises(UserError, match="model.attention"):
        kernels.resolve_attention("varlen", _tiny_qwen2("sdpa"), CUDA, "bf16-mixed")


def test_sliding_window_models_keep_sdpa(monkeypatch) -> None:
    monkeypatch.setattr(available, "has_varlen_attn", lambda: True)
    model = _tiny_qwen2("sdpa")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert kernels.resolve_attention("auto", model, CUDA, "bf16-mixed") == "sdpa"
    with pytest.raises(UserError, match="model.attention: varlen .* sliding-window"):
        kernels.resolve_attention("varlen", model, CUDA, "bf16-mixed")


# ---- GPU: FlashAttention's kernel --------------------------------------------------------------------


@pytest.mark.gpu
def test_flash_varlen_matches_the_reference_on_gpu() -> None:
    assert available.has_varlen_attn() and kernels.register_varlen()
    lengths = [37, 200, 5, 64]
    q, k, v = (t.cuda().bfloat16() for t in _qkv(7, sum(lengths), heads=12, kv_heads=2, dim=128))
    cu = torch.tensor([0, 37, 237, 242, 306], dtype=torch.int32, device="cuda")
    flash = kernels.flash_varlen_attention(q, k, v, cu, 200, 128**-0.5)
    reference = kernels.reference_varlen_attention(q.float(), k.float(), v.float(), cu, 200, 128**-0.5)
    torch.testing.assert_close(flash.float(), reference, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_packed_varlen_gives_the_padded_loss_on_gpu() -> None:
    """The issue's check: packing on FlashAttention's varlen kernel, loss and gradients equal to
    padding with SDPA within bf16 tolerance (fp32 master weights, bf16 autocast, as training runs)."""
    examples = _random_examples(seed=8, n=8)
    padded_model, packed_model = _tiny_qwen2("sdpa").cuda().train(), _tiny_qwen2("sdpa").cuda().train()
    kernels.set_attention(packed_model, "varlen")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded = _loss_and_grads(padded_model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in pad_collate(examples, pad_id=0).items()})
        packed = _loss_and_grads(packed_model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in pack_collate(examples).items()})
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-2, atol=1e-2)
    for name, grad in padded[1].items():
        assert torch.nn.functional.cosine_similarity(packed[1][name].flatten(), grad.flatten(), dim=0) > 0.99, name
