"""SFTModule: supervised fine-tuning of any transformers causal LM, loss on response tokens only."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from typing_extensions import override

from lit_sft.errors import UserError
from lit_sft.kernels import configure as configure_kernels
from lit_sft.loss import causal_lm_nll_sum
from lit_sft.weights import load_causal_lm, resolve_model_path


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, under either transformers 5 name.

    transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* and warns on
    the old names; older releases have only those.
    """
    new_names = hasattr(type(model), "activation_checkpointing_enable")
    if enabled:
        kwargs = {"use_reentrant": False}
        if new_names:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif _checkpointing_on(model):
        model.activation_checkpointing_disable() if new_names else model.gradient_checkpointing_disable()


def _checkpointing_on(model: torch.nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def lr_lambda(total: int, warmup_ratio: float, lr_schedule: str, min_lr_ratio: float):
    """Learning-rate factor per step: linear warmup from 0, then decay to `min_lr_ratio`."""
    warmup = int(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if lr_schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if lr_schedule == "cosine" else 1 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return factor


class SFTModule(LightningModule):
    """Causal-LM SFT with AdamW, warmup then decay, gradient clipping.

    One training batch is one optimizer step: the data module yields the step's micro-batches
    as a list, and each micro-batch's loss is weighted by its share of the step's target
    tokens, so accumulation gives exactly the gradient of one big batch. Manual optimization
    makes that exact (Lightning's `accumulate_grad_batches` divides by a fixed count instead)
    and makes `val_check_interval` count optimizer steps.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        gradient_clip_val: float | None = 1.0,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        kernels: Literal["none", "liger", "liger_flce"] = "none",
        attention: Literal["auto", "sdpa", "varlen"] = "auto",
    ) -> None:
        """
        Args:
            model_name_or_path: Hub id or local folder of a causal LM; None = the embedded tiny model.
            learning_rate: Peak AdamW learning rate.
            weight_decay: AdamW weight decay, applied to matrices only (not biases or norms).
            warmup_ratio: Fraction of `trainer.max_steps` spent warming up linearly from 0.
            lr_schedule: Decay after warmup, down to `min_lr_ratio * learning_rate`.
            min_lr_ratio: Final learning rate as a fraction of the peak.
            betas: AdamW betas.
            gradient_clip_val: Clip the global gradient norm to this; None disables clipping.
            gradient_checkpointing: Recompute activations in backward to save memory.
            compile: torch.compile each decoder layer (regional: all layers share one graph, so
                one short warm-up per process; dynamic shapes, since every batch has its own
                length). H200, Qwen2.5-1.5B shape: 1.55x the tokens/s of eager (docs/BENCHMARKS.md).
            kernels: "liger": Liger Kernel's Triton RMSNorm, SwiGLU and RoPE (the `liger` extra);
                "liger_flce": also the head + cross-entropy on response tokens as Liger's fused
                linear cross-entropy. CUDA only: elsewhere, or without liger-kernel, a warning
                and plain PyTorch (lit_sft.kernels).
            attention: "varlen": packed rows (`data.packing`) attend over their sequence
                boundaries with FlashAttention's varlen kernel and no mask; "sdpa": the model's
                own attention (a packed row gets a dense block-diagonal mask); "auto": varlen on
                CUDA at 16-bit precision where torch has it, else sdpa.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model_path = resolve_model_path(model_name_or_path)
        # fp32 master weights: a 2e-5 step on a bf16 weight of ~0.02 rounds away entirely;
        # bf16 compute comes from the trainer's bf16-mixed precision.
        self.model = load_causal_lm(self.model_path, dtype=torch.float32)
        self._set_gradient_checkpointing(gradient_checkpointing)
        self._set_compile(compile)
        self.examples_seen = 0
        """Examples trained on so far, over all ranks: the x axis that compares batch sizes."""
        self.eval_loss = MeanMetric()

    def _set_gradient_checkpointing(self, enabled: bool) -> None:
        # The model object is shared across trials, so set the mode explicitly either way.
        set_activation_checkpointing(self.model, enabled)
        if enabled:
            self.model.config.use_cache = False

    def _set_compile(self, enabled: bool) -> None:
        # Shared model again: a trial without compile must not inherit the last trial's.
        # nn.Module.compile keeps the compiled forward in _compiled_call_impl; None = eager.
        layers = getattr(self.model.base_model, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            if enabled:
                raise UserError(f"model.compile: no decoder layers to compile in {type(self.model).__name__} (looked for base_model.layers)")
            return
        for layer in layers:
            if enabled and layer._compiled_call_impl is None:
                layer.compile(dynamic=True)
            elif not enabled:
                layer._compiled_call_impl = None

    @override
    def on_fit_start(self) -> None:
        # The device and precision are known only now. The model is shared across trials, so
        # both choices are set either way, as compile and checkpointing are.
        configure_kernels(
            self.model, kernels=self.hparams.kernels, attention=self.hparams.attention,
            device=self.device, precision=str(self.trainer.precision),
        )

    def _common_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL over the batch's target tokens, and their count."""
        return causal_lm_nll_sum(self.model, batch)

    def _global_sum(self, value: float) -> float:
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return value
        tensor = torch.tensor(float(value), device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the step's last micro-batch."""
        wrapped = getattr(self.trainer.strategy, "model", None)
        if last or not hasattr(wrapped, "no_sync"):
            return contextlib.nullcontext()
        return wrapped.no_sync()

    @override
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        world = self.trainer.world_size
        local_tokens = sum(int(mb["num_target_tokens"]) for mb in batch)
        # DDP averages gradients over ranks, so scale by world / global tokens for a token mean.
        scale = world / max(self._global_sum(local_tokens), 1.0)
        total_nll = torch.zeros((), device=self.device)
        for i, micro in enumerate(batch):
            with self._no_sync(last=i == len(batch) - 1):
                nll, _ = self._common_step(micro)
                self.manual_backward(nll * scale)
            total_nll += nll.detach()
        if self.hparams.gradient_clip_val:
            self._clip(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self.examples_seen += int(self._global_sum(sum(int(mb["num_examples"]) for mb in batch)))
        loss = total_nll / max(local_tokens, 1)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=1)
        if self.trainer.global_step % max(self.trainer.log_every_n_steps, 1) == 0:
            # Only the logged steps reach the loggers; skipping the others saves ~1 ms a step.
            self._log_step(on_step=True)
            self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, batch_size=1)
            self.log("trainer/examples_seen", float(self.examples_seen), on_step=True, batch_size=1)
        return loss

    def _log_step(self, **kwargs: Any) -> None:
        """Log at the optimizer steps done, as the evaluator's figures and `best_step` are.

        Lightning logs at its count of batches stepped, which it raises only after the step's
        validation: `eval/loss` of the evaluation after 250 steps would land at 249. A metric
        named `step` is the step Lightning's loggers use instead (and is not logged itself).
        """
        self.log("step", float(self.global_step), batch_size=1, **kwargs)

    def _scaler(self) -> Any:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _clip(self, optimizer: Any) -> None:
        # Lightning's clip_gradients refuses fused optimizers under mixed precision; only fp16's
        # loss scaler needs its unscale step, so clip directly otherwise (bf16 and fp32).
        if self._scaler() is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm")
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hparams.gradient_clip_val)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        nll, count = self._common_step(batch)
        if count > 0:
            self.eval_loss.update(nll / count, weight=count)

    @override
    def on_validation_epoch_end(self) -> None:
        # Token-weighted mean over the whole held-out set (MeanMetric syncs across ranks).
        self.log("eval/loss", self.eval_loss.compute(), prog_bar=True, sync_dist=False)
        self.log("trainer/examples_seen", float(self.examples_seen))
        self._log_step()
        self.eval_loss.reset()

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = self.device.type == "cuda" and self._scaler() is None
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas), fused=fused)
        scheduler = LambdaLR(optimizer, self._lr_lambda(self._total_steps()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_steps(self) -> int:
        steps = self.trainer.max_steps
        if steps is None or steps < 0:
            steps = int(self.trainer.estimated_stepping_batches)
        return max(int(steps), 1)

    def _lr_lambda(self, total: int):
        hp = self.hparams
        return lr_lambda(total, hp.warmup_ratio, hp.lr_schedule, hp.min_lr_ratio)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["examples_seen"] = self.examples_seen

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.examples_seen = int(checkpoint.get("examples_seen", 0))
