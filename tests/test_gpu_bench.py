"""bench/gpu.py's plan and bookkeeping (the GPU run itself is checked on CPU by its --tiny mode)."""

from __future__ import annotations

import inspect

import torch

from bench import gpu
from lit_sft.module import SFTModule


def _state(rows: list[dict]) -> gpu.State:
    state = gpu.State(device=torch.device("cuda"), plan=gpu.gpu_plan(), out=None, workdir=None)
    state.results["throughput"] = {"rows": rows}
    return state


def test_row_names_are_unique_and_module_rows_are_sftmodule_arguments() -> None:
    params = set(inspect.signature(SFTModule.__init__).parameters)
    for plan in (gpu.gpu_plan(), gpu.tiny_plan()):
        names = [c.name for c in plan.configs]
        assert len(names) == len(set(names)), names  # --configs and the overhead's pick go by name
        for config in plan.configs:
            kwargs = config.module_kwargs()
            assert (kwargs is None) == (config.full_logits or config.kernels == "liger_forward"), config.name
            assert kwargs is None or set(kwargs) <= params, config.name


def test_overhead_runs_the_fastest_row_sftmodule_can_express() -> None:
    rows = [
        {"config": "padded mb32 full-logits", "tokens_per_s": 90_000},  # not an SFTModule setting
        {"config": "padded mb32 liger-forward", "tokens_per_s": 80_000},  # neither
        {"config": "packed mb32 varlen liger-flce compile", "error": "OOM"},
        {"config": "packed mb32 varlen", "tokens_per_s": 40_000},
        {"config": "packed mb64 varlen liger-flce", "tokens_per_s": 50_000},
    ]
    best = gpu.fastest_module_config(_state(rows))
    assert best.name == "packed mb64 varlen liger-flce"
    assert best.module_kwargs() == {"kernels": "liger_flce", "attention": "varlen", "compile": False, "gradient_checkpointing": False}
    assert gpu.fastest_module_config(_state([])).name == "padded mb32"


def test_table_lists_skipped_rows_and_ends_with_its_goals() -> None:
    results = {
        "env": {"gpu": "NVIDIA H200"},
        "throughput": {"status": "ok", "rows": [
            {"config": "padded mb32 full-logits", "tokens_per_s": 20_000, "mfu": 0.28, "step_s": 0.8, "pad_fraction": 0.3},
            {"config": "padded mb32 liger", "error": "skipped: needs CUDA (Liger's Triton kernels)"},
            {"config": "packed mb32 varlen", "tokens_per_s": 30_000, "mfu": 0.42, "step_s": 0.5, "pad_fraction": 0.0},
        ]},
        "overhead": {"status": "ok", "config": "packed mb32 varlen", "ratio": 1.01, "ratio_of_totals": 1.012, "lightning_step_ms": 505.0, "plain_step_ms": 500.0},
    }
    text = gpu.table(results)
    assert "padded mb32 liger" in text and "skipped: needs CUDA" in text
    assert "best: packed mb32 varlen: MFU 42.0% (goal >= 50%: 8.0 points short)" in text
    (varlen_line,) = [line for line in text.splitlines() if line.startswith("  packed mb32 varlen ")]
    assert varlen_line.split()[4] == "1.50"  # tokens/s over the first row's
    assert "ratio 1.0100" in text and "goal <= 1.02" in text
