"""model.kernels: Liger where it can run, plain PyTorch with a warning where it cannot, and an
undo that leaves the shared model as it was. The GPU tests compare Liger's loss and gradients
with the plain path's within bf16 tolerance."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lit_sft import available, kernels
from lit_sft import loss as loss_module
from lit_sft.loss import causal_lm_nll_sum
from lit_sft.packing import pack_collate, pad_collate
from tests.test_packing import _random_examples, _tiny_qwen2

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _fake_liger(model: torch.nn.Module) -> None:
    """Patches the way Liger's instance API does (a module global of the modeling file replaced,
    forwards and attributes bound on submodules), but with visible arithmetic, on CPU."""
    modeling = sys.modules[type(model.base_model).__module__]
    original_rope = modeling.apply_rotary_pos_emb
    modeling.apply_rotary_pos_emb = lambda q, k, cos, sin, *a, **kw: original_rope(q * 1.5, k, cos, sin, *a, **kw)
    for module in model.modules():
        if type(module).__name__ == "Qwen2RMSNorm":
            module.casting_mode = "llama"
            module.forward = (lambda self, x: x * 2.0).__get__(module)


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def _state(model: torch.nn.Module) -> tuple[dict, list]:
    modeling = sys.modules[type(model.base_model).__module__]
    return dict(vars(modeling)), [sorted(m.__dict__) for m in model.modules()]


# ---- where Liger cannot run ---------------------------------------------------------------------


@pytest.mark.parametrize("kernels_choice", ["liger", "liger_flce"])
def test_liger_off_cuda_warns_and_runs_plain(kernels_choice, caplog) -> None:
    model = _tiny_qwen2("sdpa")
    batch = pad_collate(_random_examples(seed=1), pad_id=0)
    before = _logits(model, batch)
    with caplog.at_level(logging.WARNING, logger="lit_sft.kernels"):
        in_effect = kernels.configure(model, kernels=kernels_choice, attention="auto", device=CPU, precision="32-true")
    assert in_effect == {"attention": "sdpa", "kernels": "none"}
    assert "needs a CUDA device" in caplog.text and kernels_choice in caplog.text
    assert not kernels.fused_loss_on(model)
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=0)


def test_liger_not_installed_warns_and_runs_plain(monkeypatch, caplog) -> None:
    monkeypatch.setattr(available, "has_liger", lambda: False)
    monkeypatch.setattr(kernels, "_liger_apply", lambda model: pytest.fail("Liger applied without being installed"))
    model = _tiny_qwen2("sdpa")
    with caplog.at_level(logging.WARNING, logger="lit_sft.kernels"):
        in_effect = kernels.configure(model, kernels="liger", attention="sdpa", device=CUDA, precision="bf16-mixed")
    assert in_effect["kernels"] == "none" and "pip install -e '.[liger]'" in caplog.text


# ---- patch and undo -------------------------------------------------------------------------------


def test_liger_patch_is_recorded_and_undone_exactly() -> None:
    model = _tiny_qwen2("sdpa")
    batch = pad_collate(_random_examples(seed=2), pad_id=0)
    plain, state = _logits(model, batch), _state(model)
    assert kernels.set_liger(model, True, apply=_fake_liger)
    patched = _logits(model, batch)
    assert not torch.allclose(patched, plain)
    assert kernels.set_liger(model, True, apply=lambda m: pytest.fail("applied twice"))  # already on: no second patch
    assert not kernels.set_liger(model, False)
    assert _state(model) == state
    torch.testing.assert_close(_logits(model, batch), plain, rtol=0, atol=0)
    # A model built after the undo is plain too: the module global is back.
    fresh = _tiny_qwen2("sdpa")
    torch.testing.assert_close(_logits(fresh, batch), plain, rtol=0, atol=0)


def test_liger_without_kernels_for_the_architecture_counts_as_off(caplog) -> None:
    model = _tiny_qwen2("sdpa")
    with caplog.at_level(logging.WARNING, logger="lit_sft.kernels"):
        assert not kernels.set_liger(model, True, apply=lambda m: None)
    assert "no kernels for model type 'qwen2'" in caplog.text


def test_liger_flce_routes_the_targets_only_loss_and_none_undoes_it(monkeypatch) -> None:
    monkeypatch.setattr(available, "has_liger", lambda: True)
    monkeypatch.setattr(kernels, "_liger_apply", _fake_liger)
    fused_calls = []

    def fake_fused(picked, head, targets):
        fused_calls.append(picked.shape[0])
        return torch.nn.functional.cross_entropy(head(picked).float(), targets, reduction="sum")

    monkeypatch.setattr(loss_module, "liger_head_nll_sum", fake_fused)
    model = _tiny_qwen2("sdpa")
    batch = pad_collate(_random_examples(seed=3), pad_id=0)
    plain = causal_lm_nll_sum(model, batch)[0].detach()
    assert kernels.configure(model, kernels="liger_flce", attention="sdpa", device=CUDA, precision="bf16-mixed")["kernels"] == "liger_flce"
    causal_lm_nll_sum(model, batch)
    assert fused_calls == [batch["num_target_tokens"]]  # the fused loss saw the target rows only
    assert kernels.configure(model, kernels="liger", attention="sdpa", device=CUDA, precision="bf16-mixed")["kernels"] == "liger"
    causal_lm_nll_sum(model, batch)
    assert len(fused_calls) == 1  # "liger": our own head and cross-entropy again
    assert kernels.configure(model, kernels="none", attention="sdpa", device=CUDA, precision="bf16-mixed")["kernels"] == "none"
    torch.testing.assert_close(causal_lm_nll_sum(model, batch)[0].detach(), plain, rtol=0, atol=0)


# ---- GPU: Liger against the plain path ----------------------------------------------------------------


def _gpu_model(seed: int = 0) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    # Head dimension 64 and GQA as Qwen2.5 has (128 there); large enough for Triton's tiles.
    config = Qwen2Config(
        num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
        vocab_size=2048, max_position_embeddings=1024, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(config).cuda().train()  # fp32 master weights, as SFTModule loads them


def _examples(n: int = 8) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        p, r = (int(x) for x in torch.randint(20, 120, (2,), generator=gen))
        ids = torch.randint(3, 2048, (p + r,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _to_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def _bf16_loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, count = causal_lm_nll_sum(model, batch)
    (total / count).backward()
    return (total / count).item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_bf16(got: tuple[float, dict], expected: tuple[float, dict]) -> None:
    assert got[0] == pytest.approx(expected[0], rel=1e-2)
    assert got[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        error = (got[1][name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 5e-2, f"{name}: relative gradient error {error:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernels_choice", ["liger", "liger_flce"])
@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_liger_matches_the_plain_loss_and_gradients_on_gpu(kernels_choice: str, collate: str) -> None:
    assert available.has_liger(), "the GPU run installs liger-kernel (bench/device_run.sh)"
    examples = _examples()
    batch = _to_cuda(pad_collate(examples, pad_id=0) if collate == "padded" else pack_collate(examples))
    model = _gpu_model()
    attention = "varlen" if collate == "packed" else "sdpa"
    kernels.configure(model, kernels="none", attention=attention, device=CUDA, precision="bf16-mixed")
    plain = _bf16_loss_and_grads(model, batch)
    in_effect = kernels.configure(model, kernels=kernels_choice, attention=attention, device=CUDA, precision="bf16-mixed")
    assert in_effect == {"attention": attention, "kernels": kernels_choice}
    try:
        _assert_close_bf16(_bf16_loss_and_grads(model, batch), plain)
    finally:
        kernels.configure(model, kernels="none", attention=attention, device=CUDA, precision="bf16-mixed")
    # Undone: the plain numbers again, bit for bit (the forward pass is deterministic).
    again = _bf16_loss_and_grads(model, batch)
    assert again[0] == plain[0]


@pytest.mark.gpu
def test_liger_own_forward_flce_gives_our_mean_loss_on_gpu() -> None:
    """The bench's `liger-forward` row: Liger's patched forward (fused linear cross-entropy over
    every position, labels shifted inside) gives our loss / count."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    batch = _to_cuda(pad_collate(_examples(), pad_id=0))
    model = _gpu_model()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, count = causal_lm_nll_sum(model, batch)
    ours = (total / count).item()
    kernels.set_liger(model, True, apply=lambda m: _apply_liger_kernel_to_instance(model=m, fused_linear_cross_entropy=True))
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False).loss
    finally:
        kernels.set_liger(model, False)
    assert theirs.item() == pytest.approx(ours, rel=1e-2)


# ---- through SFTModule and a Trainer ------------------------------------------------------------------


class _InEffect(Callback):
    """What the model's attention and kernels are while the fit trains, and its losses."""

    def __init__(self) -> None:
        self.states: list[dict[str, str]] = []
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append(kernels.in_effect(pl_module.model))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def _fit(model_path: str, trainer_kwargs: dict, packing: bool, **module_kwargs) -> _InEffect:
    from lit_sft.data import SFTDataModule
    from lit_sft.module import SFTModule

    module = SFTModule(model_name_or_path=model_path, **module_kwargs)
    data = SFTDataModule(tokenizer_name_or_path=model_path, num_generated=40, eval_size=8, batch_size=8, micro_batch_size=4, max_length=128, packing=packing)
    seen = _InEffect()
    Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[seen], **trainer_kwargs,
    ).fit(module, datamodule=data)
    return seen


def test_sftmodule_sets_attention_and_kernels_at_each_fit_on_cpu(tiny_model_path, one_torch_thread, caplog) -> None:
    cpu = {"accelerator": "cpu", "devices": 1}
    with caplog.at_level(logging.WARNING, logger="lit_sft.kernels"):
        first = _fit(tiny_model_path, cpu, packing=True, kernels="liger_flce", attention="varlen")
    assert first.states == [{"attention": "varlen", "kernels": "none"}] * 2  # varlen's CPU reference; no Liger off CUDA
    assert "needs a CUDA device" in caplog.text and all(torch.isfinite(torch.tensor(first.losses)))
    # The next fit shares the model (lit_sft.weights) and asks for the defaults: plain SDPA again.
    second = _fit(tiny_model_path, cpu, packing=True)
    assert second.states == [{"attention": "sdpa", "kernels": "none"}] * 2


@pytest.mark.gpu
def test_sftmodule_runs_liger_flce_on_varlen_under_bf16_mixed_on_gpu(tiny_model_path) -> None:
    assert available.has_liger() and available.has_varlen_attn()
    gpu = {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"}
    fast = _fit(tiny_model_path, gpu, packing=True, kernels="liger_flce", attention="auto")
    assert fast.states == [{"attention": "varlen", "kernels": "liger_flce"}] * 2
    assert all(torch.isfinite(torch.tensor(fast.losses)))
    plain = _fit(tiny_model_path, gpu, packing=True, attention="sdpa")
    assert plain.states == [{"attention": "sdpa", "kernels": "none"}] * 2
    # Same data, same initial weights: the first step's loss agrees within bf16 tolerance.
    assert fast.losses[0] == pytest.approx(plain.losses[0], rel=2e-2)
