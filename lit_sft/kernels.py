"""Optional fast paths for training: varlen attention over packed rows, and Liger Kernel.

Both are set on the model object, which the process shares across trials (lit_sft.weights), so
`configure` sets every choice explicitly, on or off, at each fit start.

Attention (`model.attention`):
- "sdpa": transformers' SDPA. A packed row gets a dense [1, 1, T, T] block-diagonal mask built
  from its position ids, which keeps SDPA off its flash kernel (lit_sft.packing).
- "varlen": packed rows run attention over their `cu_seq_lens_q` (built by `pack_collate`) with
  no mask at all: on CUDA torch's FlashAttention varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`), elsewhere `reference_varlen_attention` (SDPA per
  document, exact but slow: what the CPU tests compare against). Padded batches, and any call
  without `cu_seq_lens_q`, take the SDPA path with its usual masks, so the model stays correct
  for generation and for callers that never heard of varlen.
- "auto" (the default): "varlen" where the model is on CUDA, torch has `varlen_attn`, the
  precision is 16-bit (FlashAttention computes in fp16/bf16 only) and the model has no sliding-
  window layers; "sdpa" everywhere else.

Kernels (`model.kernels`):
- "liger": Liger Kernel's Triton RMSNorm, SwiGLU MLP and RoPE, applied to this model instance by
  Liger's own patching API (`_apply_liger_kernel_to_instance`); the head and loss stay
  lit_sft.loss's (logits at response positions only, torch cross-entropy).
- "liger_flce": the same, and the head + cross-entropy over those response positions as Liger's
  fused linear cross-entropy, which never materialises even their logits.
Liger's own FLCE (its patched `forward` with labels) computes the head over every position; the
GPU bench measures it as a row, it is not an option here. Liger needs CUDA and Triton: where
either is missing the model runs plain, with a warning. What Liger patched (module globals of the
architecture's modeling file, forwards bound on submodules) is recorded and undone when a later
fit asks for "none".
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_sft import available
from lit_sft.errors import UserError

log = logging.getLogger(__name__)

Attention = Literal["auto", "sdpa", "varlen"]
Kernels = Literal["none", "liger", "liger_flce"]

VARLEN = "lit_sft_varlen"
"""The attention implementation name registered with transformers' AttentionInterface."""

_LIGER_UNDO = "_lit_sft_liger_undo"
_FUSED_LOSS = "_lit_sft_fused_loss"
_ATTN_BEFORE = "_lit_sft_attn_before_varlen"
_MISSING = object()

_skip_masks: contextvars.ContextVar[bool] = contextvars.ContextVar("lit_sft_skip_masks", default=False)


# ---- varlen attention ------------------------------------------------------------------------


def _repeat_kv(key: torch.Tensor, query_heads: int) -> torch.Tensor:
    """[T, H_kv, D] -> [T, H_q, D], each KV head repeated for its group of query heads."""
    return key.repeat_interleave(query_heads // key.shape[1], dim=1) if key.shape[1] != query_heads else key


@torch.compiler.disable  # data-dependent slicing; it is the CPU tests' reference, not a fast path
def reference_varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int, scale: float | None
) -> torch.Tensor:
    """Causal attention within each [cu[i], cu[i+1]) segment, by SDPA one segment at a time.

    query [T, H_q, D], key/value [T, H_kv, D] -> [T, H_q, D]: what varlen_attn computes, written
    with nothing but SDPA, so it runs anywhere and is the CPU tests' reference.
    """
    heads = query.shape[1]
    key, value = _repeat_kv(key, heads), _repeat_kv(value, heads)
    bounds = cu_seq_lens.tolist()
    parts = []
    for start, end in itertools.pairwise(bounds):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(parts, dim=0)


_torch_varlen_fn: Any = None
_torch_varlen_params: frozenset[str] = frozenset()


def _load_torch_varlen() -> bool:
    """Import torch's varlen_attn once, into plain globals: the attention function reads them
    inside compiled decoder layers, where an import or a cache lookup would break the graph."""
    global _torch_varlen_fn, _torch_varlen_params
    if _torch_varlen_fn is None and available.has_varlen_attn():
        from torch.nn.attention.varlen import varlen_attn

        _torch_varlen_fn, _torch_varlen_params = varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)
    return _torch_varlen_fn is not None


def flash_varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int, scale: float | None,
    varlen_attn: Any = None,
) -> torch.Tensor:
    """torch's `varlen_attn`, called the way the installed torch spells it.

    Its signature moved between releases: 2.10 takes `is_causal=True` and has neither `scale` nor
    grouped-query attention; later ones take `window_size=(-1, 0)` for causal, then `enable_gqa`.
    Where GQA is missing, KV heads are repeated here, as SDPA's math path would.
    """
    if varlen_attn is None:
        fn, params = _torch_varlen_fn, _torch_varlen_params
    else:
        fn, params = varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = key.shape[1] != query.shape[1]
    else:
        key, value = _repeat_kv(key, query.shape[1]), _repeat_kv(value, query.shape[1])
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        raise ValueError(f"this torch's varlen_attn has no scale argument, and the model's scale {scale} is not 1/sqrt(head_dim)")
    return fn(query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, **kwargs)


def varlen_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int, scale: float | None
) -> torch.Tensor:
    """FlashAttention's varlen kernel on CUDA in fp16/bf16; the exact reference elsewhere."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _torch_varlen_fn is not None:
        return flash_varlen_attention(query, key, value, cu_seq_lens, max_length, scale)
    return reference_varlen_attention(query, key, value, cu_seq_lens, max_length, scale)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: varlen for rows that carry cu_seq_lens_q.

    query [1, H_q, T, D], key/value [1, H_kv, T, D] -> ([1, T, H_q, D], None), as SDPA's returns.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed row, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError("varlen attention has no attention dropout")
    if sliding_window is not None:
        raise ValueError("varlen attention does not implement sliding-window layers")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    device = query.device.type
    if torch.is_autocast_enabled(device):
        # RoPE in fp32 (fp32 master weights) leaves q and k fp32 beside a bf16 v; SDPA is cast by
        # autocast, this custom kernel is not, so cast as autocast would.
        dtype = torch.get_autocast_dtype(device)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if max_length_q is None:  # one device sync; pack_collate passes it, computed on the host
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    # Not int(max_length_q): under dynamic torch.compile it is a SymInt, and int() would
    # specialise the graph to each batch's longest document.
    out = varlen_attention(q, k, v, cu_seq_lens_q, max_length_q, scaling)
    return out.unsqueeze(0), None


def _varlen_mask(**kwargs: Any) -> Any:
    """The mask for VARLEN: none for packed rows that run varlen, SDPA's exact mask otherwise."""
    from transformers import masking_utils

    if _skip_masks.get():
        return None
    return masking_utils.sdpa_mask(**kwargs)


@functools.cache
def register_varlen() -> str:
    """Register VARLEN with transformers' attention and mask interfaces (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _load_torch_varlen()
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
    return VARLEN


def uses_varlen(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == VARLEN


@contextlib.contextmanager
def packed_forward(model: nn.Module, inputs: Mapping[str, Any]) -> Iterator[None]:
    """Around a forward of `inputs`: no mask is built where the row runs varlen attention.

    Only rows with `cu_seq_lens_q` on a VARLEN model skip it, so a packed row without them still
    gets SDPA's exact block-diagonal mask instead of silently attending across documents.
    """
    if not (uses_varlen(model) and inputs.get("cu_seq_lens_q") is not None):
        yield
        return
    token = _skip_masks.set(True)
    try:
        yield
    finally:
        _skip_masks.reset(token)


def _has_sliding_layers(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return "sliding_attention" in (getattr(config, "layer_types", None) or ()) or bool(getattr(config, "use_sliding_window", False))


def resolve_attention(choice: str, model: nn.Module, device: torch.device, precision: str) -> Literal["sdpa", "varlen"]:
    """What `model.attention` means for this model, device and trainer precision (module docstring)."""
    if choice == "sdpa":
        return "sdpa"
    if _has_sliding_layers(model):
        if choice == "varlen":
            raise UserError("model.attention: varlen does not implement sliding-window attention layers, which this model has; use sdpa")
        return "sdpa"
    if choice == "varlen":
        if device.type == "cuda" and not available.has_varlen_attn():
            raise UserError(f"model.attention: varlen needs torch.nn.attention.varlen (torch >= 2.10), this is torch {torch.__version__}")
        return "varlen"
    cuda_ready = device.type == "cuda" and available.has_varlen_attn()
    return "varlen" if cuda_ready and "16" in precision else "sdpa"


def set_attention(model: nn.Module, attention: Literal["sdpa", "varlen"]) -> None:
    """Switch the model to VARLEN, or back to the implementation it had before (its own setter,
    so every submodule follows). "sdpa" leaves a model that never ran varlen as it was loaded."""
    current = model.config._attn_implementation
    if attention == "varlen":
        if current != VARLEN:
            model.__dict__[_ATTN_BEFORE] = current
            model.set_attn_implementation(register_varlen())
    elif current == VARLEN:
        model.set_attn_implementation(model.__dict__.pop(_ATTN_BEFORE, "sdpa"))


# ---- Liger Kernel ------------------------------------------------------------------------------


def _liger_apply(model: nn.Module) -> None:
    """Liger's own instance-patching API, RMSNorm / SwiGLU / RoPE only: the loss stays ours."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


def _module_state(model: nn.Module) -> tuple[Any, dict[str, Any], dict[nn.Module, dict[str, Any]]]:
    modeling = sys.modules.get(type(model.base_model).__module__)
    return modeling, dict(vars(modeling)) if modeling else {}, {m: dict(m.__dict__) for m in model.modules()}


def _record_patch(before: tuple[Any, dict[str, Any], dict[nn.Module, dict[str, Any]]], model: nn.Module) -> list[tuple[Any, str, Any]]:
    """(owner, name, value before) for each module global and submodule attribute that changed."""
    modeling, globals_before, modules_before = before
    changes: list[tuple[Any, str, Any]] = []
    if modeling is not None:
        for name, value in vars(modeling).items():
            if globals_before.get(name, _MISSING) is not value:
                changes.append((modeling, name, globals_before.get(name, _MISSING)))
    for module, state in modules_before.items():
        for name, value in module.__dict__.items():
            if state.get(name, _MISSING) is not value:
                changes.append((module, name, state.get(name, _MISSING)))
    return changes


def _undo_patch(changes: list[tuple[Any, str, Any]]) -> None:
    for owner, name, value in reversed(changes):
        space = owner.__dict__ if isinstance(owner, nn.Module) else vars(owner)
        if value is _MISSING:
            if isinstance(owner, nn.Module):
                space.pop(name, None)
            elif hasattr(owner, name):
                delattr(owner, name)
        elif isinstance(owner, nn.Module):
            space[name] = value
        else:
            setattr(owner, name, value)


def set_liger(model: nn.Module, enabled: bool, apply: Any = None) -> bool:
    """Apply Liger's kernels to this model instance, or undo an earlier application. Returns
    whether they are on. `apply` replaces Liger's patching call (tests, on CPU)."""
    changes = getattr(model, _LIGER_UNDO, None)
    if not enabled:
        if changes is not None:
            _undo_patch(changes)
            del model.__dict__[_LIGER_UNDO]
        return False
    if changes is not None:
        return True
    before = _module_state(model)
    (apply or _liger_apply)(model)
    changes = _record_patch(before, model)
    if not changes:
        log.warning("model.kernels: Liger has no kernels for model type %r; running without them", getattr(model.config, "model_type", None))
        return False
    model.__dict__[_LIGER_UNDO] = changes
    return True


def liger_on(model: nn.Module) -> bool:
    return _LIGER_UNDO in model.__dict__


def fused_loss_on(model: nn.Module) -> bool:
    """Whether lit_sft.loss runs the head + cross-entropy as Liger's fused linear cross-entropy."""
    return bool(model.__dict__.get(_FUSED_LOSS, False))


def liger_head_nll_sum(picked: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `head(picked)` against `targets` by Liger's fused linear
    cross-entropy: chunks of rows, logits never held for all rows at once.

    Under autocast both operands are cast to the autocast dtype, as `head(picked)` would be; the
    Triton kernel itself does not autocast.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    device = picked.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else picked.dtype
    weight = head.weight.to(dtype)
    bias = head.bias.to(dtype) if getattr(head, "bias", None) is not None else None
    return liger_fused_linear_cross_entropy(picked.to(dtype), weight, targets, bias, reduction="sum").float()


# ---- one call per fit ----------------------------------------------------------------------------


def configure(model: nn.Module, *, kernels: str, attention: str, device: torch.device, precision: str) -> dict[str, str]:
    """Set the model's attention and kernels for a fit on `device` (both explicitly, on or off).

    Returns what is in effect, e.g. {"attention": "varlen", "kernels": "liger_flce"}.
    """
    resolved = resolve_attention(attention, model, device, precision)
    set_attention(model, resolved)
    want_liger = kernels in ("liger", "liger_flce")
    on = False
    if want_liger and device.type != "cuda":
        log.warning("model.kernels: %s needs a CUDA device (this fit runs on %s); running without Liger", kernels, device)
    elif want_liger and not available.has_liger():
        log.warning("model.kernels: %s needs liger-kernel (pip install -e '.[liger]'); running without Liger", kernels)
    else:
        on = want_liger
    on = set_liger(model, on)
    model.__dict__[_FUSED_LOSS] = on and kernels == "liger_flce"
    return in_effect(model)


def in_effect(model: nn.Module) -> dict[str, str]:
    """The model's attention and kernels now, in `configure`'s terms."""
    kernels = "liger_flce" if fused_loss_on(model) else "liger" if liger_on(model) else "none"
    return {"attention": "varlen" if uses_varlen(model) else "sdpa", "kernels": kernels}
