"""SFTModule: response-only loss, exact accumulation, schedules, weight reuse across runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from lit_sft.data import IGNORE, SFTDataModule
from lit_sft.module import SFTModule, _checkpointing_on
from lit_sft.training import train
from lit_sft.weights import load_causal_lm, snapshot
from tests.helpers import small_cfg


def _data(model_path: str, **kw) -> SFTDataModule:
    data = SFTDataModule(tokenizer_name_or_path=model_path, num_generated=40, eval_size=8, batch_size=4, max_length=128, **kw)
    data.setup("fit")
    return data


def test_labels_mask_exactly_prompt_and_padding(tiny_model_path):
    data = _data(tiny_model_path)
    tok = data.tokenizer
    rows = data.train_set[:4]
    (batch,) = data.collate_step(rows)
    for row in sorted(rows, key=lambda r: len(r["input_ids"])):
        i = [j for j in range(batch["input_ids"].shape[0]) if batch["input_ids"][j, : len(row["input_ids"])].tolist() == row["input_ids"]][0]
        labels, mask = batch["labels"][i], batch["attention_mask"][i]
        n_prompt = row["labels"].count(IGNORE)
        prompt_ids = tok(data._examples()[0].prompt, add_special_tokens=False)["input_ids"]
        assert n_prompt > 0 and abs(n_prompt - len(prompt_ids)) < 64
        n = len(row["input_ids"])
        assert (labels[:n_prompt] == IGNORE).all(), "prompt tokens must be masked"
        assert (labels[n_prompt:n] == batch["input_ids"][i, n_prompt:n]).all(), "response tokens are targets"
        assert (labels[n:] == IGNORE).all() and (mask[n:] == 0).all(), "padding is masked"
        assert labels[n - 1].item() == tok.eos_token_id, "the response ends with eos, so generation learns to stop"


def test_loss_is_mean_nll_of_response_tokens_by_hand(tiny_model_path):
    data = _data(tiny_model_path)
    module = SFTModule(model_name_or_path=tiny_model_path)
    (batch,) = data.collate_step(data.train_set[:4])
    with torch.no_grad():
        nll, count = module._common_step(batch)
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, n = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            target = int(batch["labels"][b, t])
            if target != IGNORE:
                total -= F.log_softmax(logits[b, t - 1].double(), dim=-1)[target].item()
                n += 1
    assert int(count) == n == batch["num_target_tokens"]
    assert abs(nll.item() / int(count) - total / n) < 1e-4


class _GradCapture(Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}


def test_accumulation_gives_the_gradient_of_one_big_batch(tiny_model_path, tmp_path):
    captured = []
    for micro in (8, 3):  # 3 does not divide 8: micro-batches of 3, 3, 2 must still be exact
        grab = _GradCapture()
        cfg = small_cfg(tiny_model_path, tmp_path, data={"micro_batch_size": micro}, model={"gradient_clip_val": None}, trainer={"max_steps": 1, "limit_val_batches": 0})
        train(cfg, callbacks=[grab])
        captured.append(grab.grads)
    big, accumulated = captured
    assert big.keys() == accumulated.keys() and big
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


class _StartSnapshot(Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        self.state = snapshot(pl_module.model)


def test_second_run_starts_from_the_initial_weights_not_the_first_runs(tiny_model_path, tmp_path):
    initial = snapshot(load_causal_lm(tiny_model_path))
    first = train(small_cfg(tiny_model_path, tmp_path, trainer={"max_steps": 2, "limit_val_batches": 0}))
    after_first = snapshot(first["model"])
    assert any(not torch.equal(after_first[k], v) for k, v in initial.items()), "run 1 must change the weights"
    start = _StartSnapshot()
    train(small_cfg(tiny_model_path, tmp_path, trainer={"max_steps": 1, "limit_val_batches": 0}), callbacks=[start])
    for name, tensor in initial.items():
        assert torch.equal(start.state[name], tensor), name


def test_schedule_warms_up_then_decays(tiny_model_path):
    module = SFTModule(model_name_or_path=tiny_model_path, warmup_ratio=0.1, min_lr_ratio=0.1)
    factor = module._lr_lambda(100)
    assert factor(0) < factor(5) < factor(10) == 1.0
    assert factor(55) < 1.0 and abs(factor(100) - 0.1) < 1e-9


def test_no_weight_decay_on_biases_and_norms(tiny_model_path):
    module = SFTModule(model_name_or_path=tiny_model_path, weight_decay=0.05)

    class _T:
        max_steps, estimated_stepping_batches, precision_plugin = 10, 10, None

    module._trainer = _T()  # configure_optimizers reads only the step budget
    groups = module.configure_optimizers()["optimizer"].param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    for name, p in module.model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name


@pytest.mark.slow  # ~25 s: inductor compiles a forward and a backward on the CPU
def test_compile_gives_the_eager_loss_and_gradients_and_is_undone_for_the_next_run(tiny_model_path):
    data = _data(tiny_model_path)
    (batch,) = data.collate_step(data.train_set[:4])

    def loss_and_grad_norm(module: SFTModule) -> tuple[torch.Tensor, int, torch.Tensor]:
        module.model.zero_grad(set_to_none=True)
        nll, count = module._common_step(batch)
        nll.backward()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.model.parameters() if p.grad is not None]))
        module.model.zero_grad(set_to_none=True)
        return nll.detach(), count, norm

    expected, count, expected_norm = loss_and_grad_norm(SFTModule(tiny_model_path))
    compiled = SFTModule(tiny_model_path, compile=True)
    layers = compiled.model.base_model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    got, got_count, got_norm = loss_and_grad_norm(compiled)
    assert got_count == count > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_norm, expected_norm, rtol=1e-3, atol=1e-5)
    SFTModule(tiny_model_path, compile=False)  # the cached model is shared: the next run is eager again
    assert all(layer._compiled_call_impl is None for layer in layers)


def test_gradient_checkpointing_gives_the_same_gradients_and_is_undone_for_the_next_run(tiny_model_path):
    data = _data(tiny_model_path)
    (batch,) = data.collate_step(data.train_set[:4])

    def grads(module: SFTModule) -> dict[str, torch.Tensor]:
        module.model.zero_grad(set_to_none=True)
        module._common_step(batch)[0].backward()
        out = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        module.model.zero_grad(set_to_none=True)
        return out

    eager = grads(SFTModule(tiny_model_path))
    checkpointed = SFTModule(tiny_model_path, gradient_checkpointing=True)
    assert _checkpointing_on(checkpointed.model) and checkpointed.model.config.use_cache is False
    for name, grad in grads(checkpointed).items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not _checkpointing_on(SFTModule(tiny_model_path).model)
