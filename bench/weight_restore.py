"""Restoring a trial's initial weights vs loading the model again with from_pretrained.

The tuner loads the model once per process (lit_sft.weights.load_causal_lm) and, for every
later trial, copies the CPU snapshot of the initial weights back into the same module. This
measures both on one model in one run: a Qwen2-0.5B-shaped model (24 layers, hidden 896,
vocab 151,936; ~494M parameters) with random weights, built and saved to a temp folder (no
download). Goal: ratio <= 0.05. The last line printed is `ratio: X`.

    python bench/weight_restore.py                    # Qwen2-0.5B shape, bf16, CPU
    python bench/weight_restore.py --device cuda      # model on the GPU, snapshot on the CPU
    python bench/weight_restore.py --size tiny        # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_sft import weights

SIZES = {
    # Qwen/Qwen2-0.5B's config.json, minus the weights.
    "qwen2-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                   "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 512, "tie_word_embeddings": True},
}


def build(out_dir: Path, size: str, dtype: torch.dtype) -> int:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SIZES[size], dtype=dtype)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return n


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def time_from_pretrained(path: str, device: str, repeats: int) -> list[float]:
    """What a trial would cost without the cache: load (page cache warm), place, materialize.

    transformers 5 memory-maps safetensors, so from_pretrained on CPU returns before a byte of
    weights is read; a trial pays that read (and the copy-on-write of every weight it updates)
    in its first step. Cloning each weight pays the same, so it is timed here too. On CUDA,
    `.to(device)` reads everything anyway.
    """
    from transformers import AutoModelForCausalLM

    out = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path)
        model.to(device)
        if device == "cpu":
            for param in model.parameters():
                param.data = param.data.clone()
        sync(device)
        out.append(time.perf_counter() - start)
        del model
    gc.collect()
    return out


@torch.no_grad()
def time_alternatives(model: torch.nn.Module, initial: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """CUDA only: the same restore from a pinned CPU snapshot and from a copy kept on the GPU."""
    state = model.state_dict()
    sources = {
        "pinned_cpu_s": {k: v.pin_memory() for k, v in initial.items()},
        "on_gpu_s": {k: v.to("cuda") for k, v in initial.items()},
    }
    out = {}
    for name, source in sources.items():
        times = []
        for _ in range(repeats):
            sync("cuda")
            start = time.perf_counter()
            for key, tensor in state.items():
                tensor.copy_(source[key], non_blocking=True)
            sync("cuda")
            times.append(time.perf_counter() - start)
        out[name] = round(statistics.median(times), 4)
    del sources
    return out


@torch.no_grad()
def time_restore(path: str, device: str, repeats: int) -> tuple[list[float], float, dict[str, float]]:
    """load_causal_lm's later calls: copy the initial-weights snapshot into the trained module."""
    weights.clear_cache()
    model = weights.load_causal_lm(path)  # the first call loads and snapshots (not timed)
    model.to(device)
    initial = weights._CACHE[(path, "None")].initial
    out = []
    for _ in range(repeats):
        for p in model.parameters():  # stand-in for a trial's training: every weight moves
            p.add_(torch.randn_like(p), alpha=1e-2)
        sync(device)
        start = time.perf_counter()
        again = weights.load_causal_lm(path)
        sync(device)
        out.append(time.perf_counter() - start)
        assert again is model
    worst = max(float((t.to("cpu") - initial[name]).abs().max()) for name, t in model.state_dict().items())
    alternatives = time_alternatives(model, initial, repeats) if device.startswith("cuda") else {}
    weights.clear_cache()
    return out, worst, alternatives


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="qwen2-0.5b")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="weights as saved (the reference model ships bf16)")
    p.add_argument("--device", default="cpu", help="where the model lives during training: cpu or cuda")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory(prefix="lit-sft-bench-") as tmp:
        start = time.perf_counter()
        n_params = build(Path(tmp), args.size, dtype)
        built_s = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**20
        load = time_from_pretrained(tmp, args.device, args.repeats)
        restore, max_diff, alternatives = time_restore(tmp, args.device, args.repeats)

    load_s, restore_s = statistics.median(load), statistics.median(restore)
    info = {
        "size": args.size, "params": n_params, "dtype": args.dtype, "device": args.device,
        "weights_mb": round(size_mb, 1), "build_s": round(built_s, 2),
        "from_pretrained_s": [round(x, 4) for x in load], "restore_s": [round(x, 4) for x in restore],
        "restore_max_abs_diff": max_diff, "restore_alternatives": alternatives, "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    print(json.dumps(info))
    if max_diff != 0.0:
        print(f"error: restored weights differ from the snapshot by {max_diff}", file=sys.stderr)
        return 1
    print(f"from_pretrained: {load_s:.3f} s (median of {args.repeats}); restore: {restore_s:.4f} s "
          f"({size_mb / 1024 / restore_s:.1f} GiB/s)")
    print(f"ratio: {restore_s / load_s:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
