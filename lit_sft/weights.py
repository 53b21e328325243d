"""Model loading with a process-wide cache, initial-weights snapshot/restore, and weight files.

Loading a 1.5B model from disk takes tens of seconds; restoring its initial weights from a CPU
copy takes a fraction of that. So the first `load_causal_lm` of a path loads it and keeps a CPU
snapshot of its parameters; every later call restores that snapshot into the same module.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lit_sft.errors import UserError


@dataclass
class _Cached:
    model: nn.Module
    initial: dict[str, torch.Tensor]
    """CPU copy of every parameter and buffer, as loaded."""


_CACHE: dict[tuple[str, str], _Cached] = {}
_LOCK = threading.Lock()


def resolve_model_path(model_name_or_path: str | None) -> str:
    """None means the embedded tiny model (built on first use)."""
    if model_name_or_path:
        return str(model_name_or_path)
    from lit_sft.tiny import tiny_model_path

    return tiny_model_path()


def _from_pretrained(path: str, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    looks_local = os.path.sep in path or path.startswith(".") or Path(path).exists()
    if looks_local and not Path(path).is_dir():
        raise UserError(f"model.model_name_or_path: no such model folder: {path}")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as err:
        # transformers raises OSError both for a missing Hub id and for an offline machine.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.model_name_or_path: cannot load {path!r}: {first_line}") from err


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's state (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's existing tensors in place (no reallocation, any device)."""
    own = model.state_dict()
    missing = set(own) - set(state)
    if missing:
        raise RuntimeError(f"snapshot lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    for name, tensor in own.items():
        tensor.copy_(state[name], non_blocking=True)


def load_causal_lm(model_name_or_path: str | None, dtype: torch.dtype | None = None) -> nn.Module:
    """The model at `model_name_or_path`, in its initial weights; loaded once per process.

    Later calls return the same module with its initial weights restored in place, so a trial
    never sees a previous trial's training. The caller owns device placement.
    """
    path = resolve_model_path(model_name_or_path)
    key = (path, str(dtype))
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is None:
            model = _from_pretrained(path, dtype)
            cached = _CACHE[key] = _Cached(model=model, initial=snapshot(model))
        else:
            restore(cached.model, cached.initial)
    cached.model.train()
    return cached.model


def clear_cache() -> None:
    """Forget every cached model (frees their memory)."""
    with _LOCK:
        _CACHE.clear()


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain HF parameter names (no `model.` wrappers from compile/DDP), contiguous CPU tensors."""
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("_orig_mod.").removeprefix("module.")
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the weights as safetensors, write-then-rename so readers never see a partial file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    # Tied embeddings share storage; safetensors refuses shared tensors, so store one name.
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head.weight" in state:
        state.pop("lm_head.weight")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path


@torch.no_grad()
def load_weights_into(model: nn.Module, path: str | Path) -> None:
    """Load a `save_weights` file into an existing model in place (no rebuild)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint file unreadable: {path}: {err}") from err
    own = model.state_dict()
    unknown = set(state) - set(own)
    if unknown:
        raise ValueError(f"checkpoint {path} has tensors the model lacks: {sorted(unknown)[:3]}")
    for name, tensor in state.items():
        own[name].copy_(tensor)
    if "lm_head.weight" in own and "lm_head.weight" not in state:
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        if not tied:
            raise ValueError(f"checkpoint {path} lacks lm_head.weight")


def read_state(model: nn.Module, path: str | Path) -> dict[str, torch.Tensor]:
    """A `save_weights` file as a full CPU state dict of `model` (tied weights filled in), for `restore`."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    # Keyed as model.state_dict() is (restore's keys), looked up under the plain HF names the file has.
    names = {raw: raw.removeprefix("_orig_mod.").removeprefix("module.") for raw in model.state_dict()}
    missing = sorted(hf for hf in names.values() if hf not in state)
    if missing:
        raise ValueError(f"weights file {path} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return {raw: state[hf] for raw, hf in names.items()}
