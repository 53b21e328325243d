"""Every GPU measurement of lit-sft in one run (~5 minutes on an H100/H200); a table prints last.

Sections, each with its own time cap; a failing one is reported and the next one runs:
  matmul      the card's measured bf16 matmul rate (the denominator of MFU)
  throughput  training tokens/s, MFU and peak memory of a Qwen2.5-1.5B-architecture model
              (random weights, bf16 weights + fused AdamW) on batches with the real MATH trace
              lengths (measured with Qwen's tokenizer, bench/qwen_tokens.py), one row per
              setting, alone and combined: the full-logits loss (the old path) vs the
              targets-only one (lit_sft.loss), padded vs packed rows, packed on SDPA's
              block-diagonal mask vs varlen FlashAttention (lit_sft.kernels), Liger Kernel
              (RMSNorm/SwiGLU/RoPE; + its fused linear cross-entropy on the target rows; its own
              patched forward, FLCE over every position), micro-batch size, torch.compile
              (regional: each decoder layer). Rows that need CUDA are listed as skipped on CPU.
  overhead    SFTModule under a Lightning Trainer vs a plain PyTorch loop on the same model,
              GPU and batches (bench/common.py: measure_step_overhead), with the fastest
              throughput row that SFTModule can express (its kernels/attention/compile/packing)
  evaluator   the transformers generate backend: prompts/s on 500 prompts of real validation
              lengths (greedy, 256 new tokens), and the time to swap weights into the resident
              model (lit_sft.weights.load_weights_into) vs building it (from_pretrained)

MFU counts 6*N + 12*L*d*T FLOPs per real (non-pad) token, T = the length of the token's own
example (packed rows hold several), N = every parameter once: the non-embedding weights plus
the tied embedding as the LM head's d*V matmul (the input lookup costs nothing). Recomputation
under gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).

    python bench/gpu.py            # on the GPU machine; details in $OUT/gpu_bench.json
    bash bench/device_run.sh       # the same with Liger installed and the GPU tests first
    python bench/gpu.py --tiny     # tiny config on CPU, under two minutes: checks the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    load_prompt_lengths,
    load_sft_pairs,
    measure_step_overhead,
    now,
    records_datamodule,
    records_from_lengths,
    sync,
    to_device,
)
from lit_sft import available, kernels
from lit_sft.loss import causal_lm_nll_sum, head_nll_sum
from lit_sft.module import set_activation_checkpointing
from lit_sft.packing import model_inputs, pack_collate, pad_collate

QWEN25_15B = {
    # Qwen2.5-1.5B / Qwen2.5-Math-1.5B as published.
    "num_hidden_layers": 28,
    "hidden_size": 1536,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
}
TINY = {**QWEN25_15B, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 1024}

SPEC_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM unless named), for reference."""


@dataclass(frozen=True)
class TrainConfig:
    packing: bool
    micro_batch: int
    checkpointing: bool = False
    compile: bool = False
    full_logits: bool = False
    """The model's own forward (logits at every position, padding included) instead of
    SFTModule's logits at target positions only (lit_sft.loss)."""
    varlen: bool = False
    """Packed rows over their cu_seq_lens with FlashAttention's varlen kernel, no mask (on CPU:
    lit_sft.kernels' per-document reference); otherwise SDPA with the block-diagonal mask."""
    kernels: str = "none"
    """"none" | "liger" | "liger_flce" as SFTModule's `kernels`; "liger_forward": Liger's own
    patched forward, its fused linear cross-entropy over every position (labels shifted inside)."""

    @property
    def name(self) -> str:
        parts = ["packed" if self.packing else "padded", f"mb{self.micro_batch}"]
        parts += ["varlen"] if self.varlen else []
        parts += [self.kernels.replace("_", "-")] if self.kernels != "none" else []
        parts += ["ckpt"] if self.checkpointing else []
        parts += ["compile"] if self.compile else []
        parts += ["full-logits"] if self.full_logits else []
        return " ".join(parts)

    @property
    def needs_cuda(self) -> bool:
        return self.kernels != "none"  # Triton

    def module_kwargs(self) -> dict[str, Any] | None:
        """SFTModule's arguments for this row; None where SFTModule has no such setting."""
        if self.full_logits or self.kernels == "liger_forward":
            return None
        return {"kernels": self.kernels, "attention": "varlen" if self.varlen else "sdpa", "compile": self.compile,
                "gradient_checkpointing": self.checkpointing}


@dataclass
class Plan:
    """What to run and for how long: the full GPU plan or the tiny CPU check."""

    model: dict[str, Any]
    dtype: torch.dtype
    length_scale: float
    global_batch: int
    max_length: int
    configs: list[TrainConfig]
    warmup_steps: int
    measure_steps: int
    measure_s: float
    compile_warmup_steps: int
    config_budget_s: float
    """Section time a config needs to be started (eager; compiled ones need compile_budget_s)."""
    compile_budget_s: float
    matmul_n: int
    matmul_s: float
    overhead: dict[str, Any]
    eval_prompts: int
    eval_new_tokens: int
    eval_batch: int
    caps_s: dict[str, float]


def gpu_plan() -> Plan:
    # Most telling first: a section that runs out of time skips the rest. Padded and packed-SDPA
    # rows at micro-batch 8/16/32 (full logits) were taken on 2026-11-28 (docs/BENCHMARKS.md).
    eager = [
        TrainConfig(False, 32, full_logits=True),  # the old path: the baseline of every gain below
        TrainConfig(False, 32),  # + targets-only loss
        TrainConfig(True, 32),  # packed on SDPA's dense block-diagonal mask
        TrainConfig(True, 32, varlen=True),  # packed on varlen FlashAttention
        TrainConfig(False, 32, kernels="liger"),
        TrainConfig(False, 32, kernels="liger_flce"),
        TrainConfig(False, 32, kernels="liger_forward"),  # the library's own FLCE: the head over every position
        TrainConfig(True, 32, varlen=True, kernels="liger_flce"),
        TrainConfig(True, 64, varlen=True, kernels="liger_flce"),
        TrainConfig(False, 8, checkpointing=True),  # the reference config until this run (configs/qwen2.5-math-1.5b)
    ]
    # Compiled runs last: nothing undoes a compile, and each pays its warm-up.
    # Ordered so that each change of kernels or attention (a recompile) comes as late as it can.
    compiled = [
        TrainConfig(True, 32, varlen=True, kernels="liger_flce", compile=True),
        TrainConfig(True, 64, varlen=True, kernels="liger_flce", compile=True),
        TrainConfig(True, 32, varlen=True, compile=True),
        TrainConfig(False, 32, compile=True),
    ]
    return Plan(
        model=QWEN25_15B, dtype=torch.bfloat16, length_scale=1.0, global_batch=64, max_length=2048,
        configs=eager + compiled, warmup_steps=1, measure_steps=5, measure_s=5.0, compile_warmup_steps=3, config_budget_s=12, compile_budget_s=45,
        matmul_n=8192, matmul_s=3.0,
        overhead={"batch_size": 64, "warmup": 2, "rounds": 4, "block": 2},
        # Batches of 64 did not finish 500 prompts in 85 s (2026-11-28): a decode step of a 1.5B model
        # costs about as much for 64 rows as for 256, so try 256 (KV cache ~3 GiB at these lengths).
        eval_prompts=500, eval_new_tokens=256, eval_batch=256,
        # Sized to one device session (15 min, machine start included): bench/device_run.sh.
        caps_s={"matmul": 15, "profile": 60, "throughput": 180, "overhead": 70, "evaluator": 60},
    )


def tiny_plan() -> Plan:
    # The GPU plan's kinds of row on a tiny model: every code path the GPU run takes that a CPU
    # can take (varlen rows run lit_sft.kernels' reference attention here; Liger rows are listed
    # as skipped), in well under two minutes on two cores.
    return Plan(
        model=TINY, dtype=torch.float32, length_scale=0.25, global_batch=16, max_length=512,
        configs=[
            TrainConfig(False, 8, full_logits=True), TrainConfig(False, 8), TrainConfig(True, 8), TrainConfig(True, 8, varlen=True),
            TrainConfig(False, 8, kernels="liger"), TrainConfig(False, 8, kernels="liger_flce"), TrainConfig(False, 8, kernels="liger_forward"),
            TrainConfig(True, 8, varlen=True, kernels="liger_flce"), TrainConfig(False, 4, checkpointing=True),
            TrainConfig(True, 8, varlen=True, kernels="liger_flce", compile=True), TrainConfig(True, 8, varlen=True, compile=True),
        ],
        warmup_steps=1, measure_steps=2, measure_s=3.0, compile_warmup_steps=1, config_budget_s=5, compile_budget_s=45,
        matmul_n=256, matmul_s=0.5,
        overhead={"batch_size": 16, "warmup": 1, "rounds": 2, "block": 1},
        eval_prompts=16, eval_new_tokens=8, eval_batch=8,
        caps_s={"matmul": 20, "profile": 120, "throughput": 150, "overhead": 90, "evaluator": 60},
    )


# ---- section machinery -------------------------------------------------------------------------


class SectionTimeout(BaseException):
    """Raised by the alarm when a section runs past its cap. BaseException so that the
    per-config `except Exception` inside a section does not swallow it."""


@contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"time cap of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class State:
    """What sections hand on to later ones."""

    device: torch.device
    plan: Plan
    out: Path
    workdir: Path
    results: dict[str, Any] = field(default_factory=dict)
    deadline: float = math.inf
    """perf_counter() at which the running section's cap expires."""
    matmul_tflops: float | None = None
    model: torch.nn.Module | None = None
    checkpoint: Path | None = None
    only_configs: set[str] = field(default_factory=set)
    """Throughput configs to run (by name); empty = all."""
    liger_mode: str = "none"
    """What Liger patch the throughput model has now: "none", "kernels" or "forward"."""

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_bench.json").write_text(json.dumps(self.results, indent=2, default=str))


def run_section(state: State, name: str, fn: Callable[[State], dict[str, Any]]) -> None:
    cap = state.plan.caps_s[name]
    start = time.perf_counter()
    state.deadline = start + cap
    print(f"== {name} (cap {cap:.0f} s)", flush=True)
    try:
        with time_cap(cap):
            result = fn(state)
        result["status"] = "ok"
    except (Exception, SectionTimeout) as err:
        traceback.print_exc()
        partial = state.results.get(name, {})
        result = {**partial, "status": "timeout" if isinstance(err, SectionTimeout) else "error", "error": f"{type(err).__name__}: {err}"}
    result["seconds"] = round(time.perf_counter() - start, 1)
    state.results[name] = result
    state.save()
    print(f"== {name}: {result['status']} in {result['seconds']} s", flush=True)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- model ---------------------------------------------------------------------------------------


def build_model(state: State) -> torch.nn.Module:
    """Random-weight model of the plan's architecture, initialized directly on the device."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**state.plan.model, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    with torch.device(state.device):
        model = AutoModelForCausalLM.from_config(config, dtype=state.plan.dtype, attn_implementation="sdpa")
    return model.train()


def ensure_checkpoint(state: State) -> Path:
    """A save_pretrained folder of the model (the throughput section's, or a fresh one)."""
    if state.checkpoint is None:
        model = state.model if state.model is not None else build_model(state)
        path = state.workdir / "model"
        model.save_pretrained(path)
        state.checkpoint = path
    state.model = None
    free_memory()
    return state.checkpoint


def flop_count(model: torch.nn.Module) -> int:
    """N of the MFU formula: parameters counted once (a tied embedding is one matrix)."""
    return sum(p.numel() for p in model.parameters())


# ---- sections ------------------------------------------------------------------------------------


def env_info(state: State) -> dict[str, Any]:
    import lightning
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "device": str(state.device),
        "plan": "tiny" if state.plan.model is TINY else "qwen2.5-1.5b",
        "varlen_attn": available.has_varlen_attn(),
        "liger_kernel": _version("liger_kernel") if available.has_liger() else None,
    }
    if state.device.type == "cuda":
        props = torch.cuda.get_device_properties(state.device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def spec_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in SPEC_BF16_TFLOPS.items():  # "H100 PCIe" is listed before "H100"
        if key in device_name:
            return value
    return None


def section_matmul(state: State) -> dict[str, Any]:
    # The training dtype's rate: bf16 on the GPU (fp32 in the CPU check, where MFU means little).
    n, dtype = state.plan.matmul_n, state.plan.dtype
    a = torch.randn(n, n, device=state.device, dtype=dtype)
    b = torch.randn(n, n, device=state.device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters, start = 0, now(state.device)
    while True:
        for _ in range(10):
            a @ b
        iters += 10
        elapsed = now(state.device) - start
        if elapsed >= state.plan.matmul_s:
            break
    tflops = 2 * n**3 * iters / elapsed / 1e12
    state.matmul_tflops = tflops
    name = state.results.get("env", {}).get("gpu")
    return {"n": n, "dtype": str(dtype), "iterations": iters, "tflops": float(f"{tflops:.4g}"), "spec_tflops": spec_tflops(name)}


def make_steps(state: State, config: TrainConfig, records: list[dict[str, Any]], count: int, seed: int) -> Iterator[tuple[list[dict[str, Any]], list[int]]]:
    """Optimizer steps as the data module builds them: a random global batch, sorted by length,
    split into micro-batches, each padded or packed. Yields (micro-batches, example lengths)."""
    rng = random.Random(seed)
    for _ in range(count):
        rows = sorted(rng.sample(records, state.plan.global_batch), key=lambda r: len(r["input_ids"]))
        micro = [rows[i : i + config.micro_batch] for i in range(0, len(rows), config.micro_batch)]
        batches = [pack_collate(m) if config.packing else pad_collate(m, pad_id=0) for m in micro]
        yield batches, [len(r["input_ids"]) for r in rows]


def liger_forward_apply(model: torch.nn.Module) -> None:
    """Liger's patching API as its README shows it: kernels and its own fused linear
    cross-entropy forward (the head over every position of the row)."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True)


def apply_config(state: State, model: torch.nn.Module, config: TrainConfig) -> None:
    """Set the row's checkpointing, attention and kernels on the shared throughput model; Liger is
    re-patched only when its mode changes (a compiled layer would otherwise see new forwards)."""
    set_activation_checkpointing(model, config.checkpointing)
    mode = {"none": "none", "liger_forward": "forward"}.get(config.kernels, "kernels")
    if "forward" in (mode, state.liger_mode):
        kernels.set_liger(model, False)  # the two Liger patches never stack
    choice = config.kernels if mode == "kernels" else "none"
    in_effect = kernels.configure(model, kernels=choice, attention="varlen" if config.varlen else "sdpa", device=state.device,
                                  precision="bf16-true" if state.plan.dtype == torch.bfloat16 else "32-true")
    if in_effect["kernels"] != choice:
        raise RuntimeError(f"{config.name}: Liger did not apply ({in_effect})")
    if mode == "forward" and not kernels.set_liger(model, True, apply=liger_forward_apply):
        raise RuntimeError(f"{config.name}: Liger's forward did not apply")
    state.liger_mode = mode


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]], device: torch.device,
               config: TrainConfig | None = None) -> None:
    """One optimizer step the way SFTModule takes it (token-weighted accumulation, clip)."""
    scale = 1.0 / max(sum(mb["num_target_tokens"] for mb in micro_batches), 1)
    for micro in micro_batches:
        micro = to_device(micro, device)
        if config is not None and config.kernels == "liger_forward":
            inputs = model_inputs(micro)
            with kernels.packed_forward(model, inputs):
                nll = model(**inputs, labels=micro["labels"]).loss * micro["num_target_tokens"]
        else:
            full_logits = config is not None and config.full_logits
            nll, _ = causal_lm_nll_sum(model, micro, targets_only=False if full_logits else None)
        (nll * scale).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def compile_layers(model: torch.nn.Module) -> None:
    """Regional compilation: each decoder layer, which all share one compiled graph, so the cold
    start is one layer's, not the whole model's; dynamic, since every batch has its own length."""
    for layer in model.model.layers:
        layer.compile(dynamic=True)


def measure_config(state: State, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig, records: list[dict[str, Any]], n_params: int) -> dict[str, Any]:
    plan, device = state.plan, state.device
    cfg = model.config
    apply_config(state, model, config)
    warmup = plan.compile_warmup_steps if config.compile else plan.warmup_steps
    # One seed for every config: padded and packed runs see the same global batches.
    steps = make_steps(state, config, records, warmup + plan.measure_steps, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = now(device)
    for _ in range(warmup):
        train_step(model, optimizer, next(steps)[0], device, config)
    warm_s = now(device) - start
    tokens = flops = measured = slots = 0
    start = now(device)
    for micro_batches, lengths in steps:
        train_step(model, optimizer, micro_batches, device, config)
        measured += 1
        tokens += sum(lengths)
        slots += sum(mb["input_ids"].numel() for mb in micro_batches)
        flops += sum(6 * n_params * t + 12 * cfg.num_hidden_layers * cfg.hidden_size * t * t for t in lengths)
        if now(device) - start >= plan.measure_s:
            break
    elapsed = now(device) - start
    result = {
        "config": config.name,
        **asdict(config),
        "steps": measured,
        "step_s": round(elapsed / measured, 4),
        "tokens_per_s": round(tokens / elapsed),
        "model_tflops": round(flops / elapsed / 1e12, 1),
        # On CPU (--tiny) a 256² fp32 matmul is no ceiling: MFU would read as several hundred percent.
        "mfu": round(flops / elapsed / 1e12 / state.matmul_tflops, 4) if state.matmul_tflops and device.type == "cuda" else None,
        "warmup_s": round(warm_s, 1),
        "pad_fraction": round(1 - tokens / slots, 3),
        "attention": "varlen" if config.varlen else "sdpa",
    }
    if config.varlen and device.type != "cuda":
        result["note"] = "varlen on CPU: the per-document reference, not FlashAttention"
    spec = spec_tflops(state.results.get("env", {}).get("gpu"))
    if spec:
        result["mfu_vs_spec"] = round(flops / elapsed / 1e12 / spec, 4)
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
    """train_step with the device synchronized around each phase: where a step's time goes."""
    phases = dict.fromkeys(("to_device", "decoder", "head_and_loss", "backward", "optimizer"), 0.0)
    cpu_start, wall_start = time.process_time(), now(device)
    scale = 1.0 / max(sum(mb["num_target_tokens"] for mb in micro_batches), 1)
    for micro in micro_batches:
        t0 = now(device)
        micro = to_device(micro, device)
        t1 = now(device)
        hidden = model.base_model(**model_inputs(micro)).last_hidden_state
        t2 = now(device)
        nll, _ = head_nll_sum(hidden, model.get_output_embeddings(), micro["labels"])
        t3 = now(device)
        (nll * scale).backward()
        t4 = now(device)
        del hidden, nll
        for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name] += seconds
    t5 = now(device)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phases["optimizer"] = now(device) - t5
    phases["wall"] = now(device) - wall_start
    phases["cpu_process"] = time.process_time() - cpu_start
    return {k: round(v, 4) for k, v in phases.items()}


def device_time_s(events: Any) -> float:
    """Summed kernel time of profiler events (attribute renamed across torch versions)."""
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    return sum(getattr(e, attr) for e in events) / 1e6


def section_profile(state: State) -> dict[str, Any]:
    """Where a step's time goes: phase timings for two configs, and a profiler table of one step."""
    from torch.profiler import ProfilerActivity, profile

    plan, device = state.plan, state.device
    model = state.model = state.model if state.model is not None else build_model(state)
    records = records_from_lengths(load_sft_pairs(), model.config.vocab_size, seed=0, scale=plan.length_scale, max_length=plan.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    result: dict[str, Any] = {"phases": {}}
    state.results["profile"] = result
    for config in (TrainConfig(False, 16), TrainConfig(True, 32)):
        steps = make_steps(state, config, records, 3, seed=0)
        train_step(model, optimizer, next(steps)[0], device)
        result["phases"][config.name] = timed_step(model, optimizer, next(steps)[0], device)
        print(f"  {config.name}: {result['phases'][config.name]}", flush=True)
    micro_batches = next(make_steps(state, TrainConfig(False, 16), records, 1, seed=1))[0]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = now(device)
    with profile(activities=activities) as prof:
        train_step(model, optimizer, micro_batches, device)
        sync(device)
    wall = now(device) - start
    events = prof.key_averages()
    sort_device = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    tables = {"by_cpu": events.table(sort_by="self_cpu_time_total", row_limit=15)}
    if device.type == "cuda":
        tables["by_device"] = events.table(sort_by=sort_device, row_limit=15)
        result["profiled_step_wall_s"] = round(wall, 3)
        result["profiled_kernel_s"] = round(device_time_s(events), 3)
    for name, text in tables.items():
        print(f"  profile {name}:\n{text}", flush=True)
        (state.out / f"profile_{name}.txt").write_text(text)
    del optimizer
    free_memory()
    return result


def section_throughput(state: State) -> dict[str, Any]:
    plan = state.plan
    model = state.model = state.model if state.model is not None else build_model(state)
    n_params = flop_count(model)
    records = records_from_lengths(load_sft_pairs(), model.config.vocab_size, seed=0, scale=plan.length_scale, max_length=plan.max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=state.device.type == "cuda")
    rows: list[dict[str, Any]] = []
    summary = {"n_params_flops": n_params, "global_batch": plan.global_batch, "dtype": str(plan.dtype), "rows": rows}
    state.results["throughput"] = summary
    compiled = False
    try:
        for config in plan.configs:
            if state.only_configs and config.name not in state.only_configs:
                continue
            if config.needs_cuda and state.device.type != "cuda":
                rows.append({"config": config.name, "error": "skipped: needs CUDA (Liger's Triton kernels)"})
                continue
            needed = plan.compile_budget_s if config.compile else plan.config_budget_s
            if state.time_left() < needed:
                rows.append({"config": config.name, "error": f"skipped: {state.time_left():.0f} s left in the section, {needed:.0f} s needed"})
                continue
            if config.compile and not compiled:
                compile_layers(model)
                compiled = True
            try:
                row = measure_config(state, model, optimizer, config, records, n_params)
            except torch.OutOfMemoryError as err:
                row = {"config": config.name, "error": f"OOM: {str(err).splitlines()[0]}"}
            except Exception as err:  # one failing config (e.g. a compile error) must not end the grid
                traceback.print_exc()
                row = {"config": config.name, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
            optimizer.zero_grad(set_to_none=True)
            free_memory()
            rows.append(row)
            state.save()
            print("  " + json.dumps(row), flush=True)
    finally:
        # Also after a section timeout: Liger patches module globals of transformers' Qwen2 file,
        # which the next sections' freshly loaded models would otherwise be built with.
        set_activation_checkpointing(model, False)
        kernels.set_liger(model, False)
        kernels.set_attention(model, "sdpa")
        state.liger_mode = "none"
        del optimizer
        free_memory()
    return summary


def fastest_module_config(state: State) -> TrainConfig:
    """The throughput row with the most tokens/s that SFTModule can run as it is configured; a
    plain padded row when the throughput section has not run."""
    rows = [r for r in state.results.get("throughput", {}).get("rows", []) if "tokens_per_s" in r]
    by_name = {c.name: c for c in state.plan.configs}
    eligible = [(r["tokens_per_s"], by_name[r["config"]]) for r in rows if r["config"] in by_name and by_name[r["config"]].module_kwargs()]
    if eligible:
        return max(eligible, key=lambda pair: pair[0])[1]
    return TrainConfig(False, 32 if state.device.type == "cuda" else 8)


def section_overhead(state: State) -> dict[str, Any]:
    from lit_sft.module import SFTModule
    from lit_sft.weights import clear_cache

    path = ensure_checkpoint(state)
    config = fastest_module_config(state)
    knobs = dict(state.plan.overhead)
    batch_size = knobs.pop("batch_size")
    module = SFTModule(model_name_or_path=str(path), learning_rate=2e-5, gradient_clip_val=knobs.pop("gradient_clip_val"), **config.module_kwargs())
    records = records_from_lengths(load_sft_pairs(), module.model.config.vocab_size, seed=1, scale=state.plan.length_scale, max_length=state.plan.max_length)
    data = records_datamodule(records, pad_id=0, batch_size=batch_size, micro_batch_size=min(config.micro_batch, batch_size),
                              max_length=state.plan.max_length, packing=config.packing)
    cuda = state.device.type == "cuda"
    trainer_kwargs = {"accelerator": "gpu" if cuda else "cpu", "precision": "bf16-mixed" if cuda else "32-true"}
    try:
        result = measure_step_overhead(module, data, trainer_kwargs, **knobs)
        in_effect = kernels.in_effect(module.model)
    finally:
        kernels.set_liger(module.model, False)
        kernels.set_attention(module.model, "sdpa")
        del module
        clear_cache()
        free_memory()
    return {**result.as_dict(), "config": config.name, "in_effect": in_effect, "batch_size": batch_size, **state.plan.overhead,
            "precision": trainer_kwargs["precision"], "model_dtype": "float32 master weights"}


SPECIAL_WORDS = ("<unk>", "<pad>", "<eos>", "abcdef", "</answer>")
"""The word tokenizer's first ids. generate's StopStringCriteria learns how tokens print by
tokenizing the probe "abcdef", and refuses a vocabulary in which no token spells part of the
stop string "</answer>", so both must be words; they are never used in prompts. Special tokens
are matched inside words, so none may be a substring of a prompt word ("w123")."""


def word_tokenizer(vocab_size: int) -> Any:
    """A real fast tokenizer with one word per token id: prompts of an exact token length
    through the evaluator's own code path, with no Qwen tokenizer available offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL_WORDS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_WORDS), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def prompts_of_lengths(lengths: list[int], vocab_size: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(len(SPECIAL_WORDS), vocab_size)}" for _ in range(n)) for n in lengths]


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    start = now(device)
    value = fn()
    return now(device) - start, value


def section_evaluator(state: State) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from lit_sft.weights import load_weights_into, save_weights

    plan, device = state.plan, state.device
    path = ensure_checkpoint(state)
    result: dict[str, Any] = {}
    state.results["evaluator"] = result
    load_s, model = timed(device, lambda: AutoModelForCausalLM.from_pretrained(path, dtype=plan.dtype).to(device))
    result["from_pretrained_s"] = round(load_s, 2)
    weights = save_weights(model, state.workdir / "weights.safetensors")
    swaps = [timed(device, lambda: load_weights_into(model, weights))[0] for _ in range(2)]
    result.update(load_weights_into_s=[round(s, 2) for s in swaps], weights_file_gib=round(weights.stat().st_size / 2**30, 2))
    state.save()

    vocab = model.config.vocab_size
    lengths = [max(1, round(n * plan.length_scale)) for n in load_prompt_lengths()][: plan.eval_prompts]
    prompts = prompts_of_lengths(lengths, vocab)
    generate, backend_name = make_generate(model, word_tokenizer(vocab), device, plan)
    warm_s, _ = timed(device, lambda: generate(prompts[:1]))  # kernels, stop-string tables: once per process
    result["first_generate_s"] = round(warm_s, 2)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # the backend's own order
    done = new_tokens = 0
    result.update(backend=backend_name, of_prompts=len(prompts), batch_size=plan.eval_batch, max_new_tokens=plan.eval_new_tokens,
                  mean_prompt_tokens=round(statistics.mean(lengths), 1), batch_s=[])
    start = last = now(device)
    # Batch by batch, recording as it goes, so the section's cap cuts the work short instead of
    # losing all of it.
    for i in range(0, len(order), plan.eval_batch):
        chunk = [prompts[j] for j in order[i : i + plan.eval_batch]]
        new_tokens += sum(generate(chunk))
        done += len(chunk)
        t = now(device)
        batch_s, last, elapsed = t - last, t, t - start
        result["batch_s"].append(round(batch_s, 2))
        result.update(
            prompts=done, seconds=round(elapsed, 1), prompts_per_s=round(done / elapsed, 2),
            new_tokens_per_s=round(new_tokens / elapsed), mean_new_tokens=round(new_tokens / done, 1),
        )
        state.save()
        print(f"  generated {done}/{len(prompts)} prompts in {elapsed:.1f} s (last batch {batch_s:.1f} s)", flush=True)
        if state.time_left() < 1.5 * batch_s + 5:
            break
    del model
    free_memory()
    return result


def make_generate(model: torch.nn.Module, tokenizer: Any, device: torch.device, plan: Plan) -> tuple[Callable[[list[str]], list[int]], str]:
    """prompts -> generated token counts, through lit_sft's transformers backend when present."""
    try:
        from lit_sft.evaluator.backends import TransformersBackend
    except ImportError:
        return _plain_generate(model, tokenizer, device, plan), "model.generate (backend missing)"
    backend = TransformersBackend(model, tokenizer, str(device), plan.eval_new_tokens, plan.eval_batch)
    return (lambda prompts: [g.num_tokens for g in backend.generate(prompts)]), "lit_sft TransformersBackend"


def _plain_generate(model: torch.nn.Module, tokenizer: Any, device: torch.device, plan: Plan) -> Callable[[list[str]], list[int]]:
    tokenizer.padding_side = "left"

    @torch.inference_mode()
    def generate(prompts: list[str]) -> list[int]:
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, do_sample=False, max_new_tokens=plan.eval_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1] :]
        return (new != tokenizer.pad_token_id).sum(dim=1).tolist()

    return generate


# ---- table ---------------------------------------------------------------------------------------


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec) if spec else str(value)


def table(results: dict[str, Any]) -> str:
    env, lines = results.get("env", {}), []
    lines.append(f"device: {env.get('gpu', env.get('device'))}  torch {env.get('torch')}  transformers {env.get('transformers')}  lightning {env.get('lightning')}  "
                 f"liger-kernel {env.get('liger_kernel')}  varlen_attn {env.get('varlen_attn')}")
    mm = results.get("matmul", {})
    lines.append(f"{mm.get('dtype')} matmul: {fmt(mm.get('tflops'), '.4g')} TFLOP/s measured (spec {fmt(mm.get('spec_tflops'))})  [{mm.get('status')}]")
    tp = results.get("throughput", {})
    lines.append(f"training throughput [{tp.get('status')}]  N={fmt(tp.get('n_params_flops'), ',')}  global batch {tp.get('global_batch')}  {tp.get('dtype')}")
    # "x first": tokens/s over the first measured row's, the plan's baseline (the old full-logits path).
    lines.append(f"  {'config':<44}{'tok/s':>10}{'x first':>8}{'MFU':>8}{'MFU spec':>10}{'step s':>9}{'mem GiB':>9}{'pad %':>7}")
    base = next((r["tokens_per_s"] for r in tp.get("rows", []) if "tokens_per_s" in r), None)
    for row in tp.get("rows", []):
        if "error" in row:
            lines.append(f"  {row['config']:<44}{row['error'][:70]}")
            continue
        lines.append(
            f"  {row['config']:<44}{row['tokens_per_s']:>10,}{row['tokens_per_s'] / base:>8.2f}{fmt(row.get('mfu'), '.1%'):>8}"
            f"{fmt(row.get('mfu_vs_spec'), '.1%'):>10}{row['step_s']:>9.3f}{fmt(row.get('peak_mem_gib'), '.1f'):>9}{100 * row['pad_fraction']:>7.1f}"
        )
    measured = [r for r in tp.get("rows", []) if r.get("mfu") is not None]
    if measured:
        best = max(measured, key=lambda r: r["mfu"])
        verdict = "met" if best["mfu"] >= 0.5 else f"{50 - 100 * best['mfu']:.1f} points short"
        lines.append(f"  best: {best['config']}: MFU {best['mfu']:.1%} (goal >= 50%: {verdict})")
    prof = results.get("profile", {})
    for name, ph in prof.get("phases", {}).items():
        lines.append(
            f"profile {name}: wall {ph['wall']:.3f} s = decoder {ph['decoder']:.3f} + head+loss {ph['head_and_loss']:.3f} + bwd {ph['backward']:.3f} "
            f"+ opt {ph['optimizer']:.3f} + h2d {ph['to_device']:.3f}; CPU process time {ph['cpu_process']:.3f} s"
        )
    if "profiled_kernel_s" in prof:
        lines.append(f"profile: kernels busy {prof['profiled_kernel_s']:.3f} s of a {prof['profiled_step_wall_s']:.3f} s step (profiler on)")
    oh = results.get("overhead")
    if oh is not None:
        lines.append(
            f"lightning vs plain loop [{oh.get('status')}] on {oh.get('config')} {oh.get('in_effect', '')}: ratio {fmt(oh.get('ratio'), '.4f')} "
            f"(totals {fmt(oh.get('ratio_of_totals'), '.4f')}; goal <= 1.02), step {fmt(oh.get('lightning_step_ms'), '.1f')} vs {fmt(oh.get('plain_step_ms'), '.1f')} ms"
        )
    ev = results.get("evaluator")
    if ev is not None:
        lines.append(
            f"evaluator [{ev.get('status')}]: {fmt(ev.get('prompts_per_s'))} prompts/s ({fmt(ev.get('prompts'))}/{fmt(ev.get('of_prompts'))} prompts, "
            f"{fmt(ev.get('new_tokens_per_s'))} new tok/s, mean {fmt(ev.get('mean_new_tokens'))} new tokens), "
            f"swap {fmt(ev.get('load_weights_into_s'))} s vs from_pretrained {fmt(ev.get('from_pretrained_s'))} s"
        )
    for name, section in results.items():
        if isinstance(section, dict) and section.get("status") not in (None, "ok"):
            lines.append(f"{name}: {section.get('status')}: {section.get('error', '')[:150]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, few steps, CPU unless a GPU is present")
    parser.add_argument("--sections", default="matmul,throughput,overhead,evaluator", help="comma list; also: profile")
    parser.add_argument("--configs", default="", help='throughput configs by name, e.g. "padded mb16 compile,packed mb8"')
    parser.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS", help="override a section's time cap")
    parser.add_argument("--no-clip", action="store_true",
                        help="overhead section without gradient clipping, in both loops (SFTModule's clip_gradients "
                             "refuses a fused AdamW under bf16-mixed in Lightning 2.6)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = tiny_plan() if args.tiny else gpu_plan()
    for item in args.cap:
        section, _, seconds = item.partition("=")
        plan.caps_s[section] = float(seconds)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("no GPU: the full plan would take hours on CPU; run with --tiny", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT") or "bench_out")
    with tempfile.TemporaryDirectory(prefix="lit-sft-bench-") as workdir:
        state = State(device=device, plan=plan, out=out, workdir=Path(workdir))
        state.results["env"] = env_info(state)
        state.only_configs = {c.strip() for c in args.configs.split(",") if c.strip()}
        state.plan.overhead["gradient_clip_val"] = None if args.no_clip else 1.0
        sections = {
            "matmul": section_matmul, "profile": section_profile, "throughput": section_throughput,
            "overhead": section_overhead, "evaluator": section_evaluator,
        }
        for name in args.sections.split(","):
            run_section(state, name, sections[name])
    print(f"details: {out / 'gpu_bench.json'}")
    print(table(state.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
