"""The vLLM adapter's own logic, against a small stand-in for vLLM's `LLM` (vLLM needs a GPU).

Only vLLM itself is replaced: the weight files, the worker extension that loads them, the
grading and the result summary are the real ones. The last test runs real vLLM where it exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from lit_sft.evaluator.backends import (
    LOAD_METHOD,
    STOP,
    VllmBackend,
    WeightFileLoader,
    _visible_devices,
    sampling_kwargs,
)
from lit_sft.evaluator.worker import WorkerSpec, evaluate
from lit_sft.weights import save_weights


class VllmStyleModel:
    """vLLM's model API in miniature: `load_weights` takes (HF name, tensor) pairs."""

    def __init__(self, hf_model: torch.nn.Module) -> None:
        self.hf_model = hf_model
        self.loaded: list[str] = []

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = self.hf_model.state_dict()
        for name, tensor in weights:
            params[name].copy_(tensor)
            self.loaded.append(name)
        return set(self.loaded)


@dataclass
class _ModelRunner:
    model: VllmStyleModel


class FakeGpuWorker(WeightFileLoader):
    """vLLM mixes the extension into its GPU worker, which has `model_runner.model`."""

    def __init__(self, model: VllmStyleModel) -> None:
        self.model_runner = _ModelRunner(model)


@dataclass
class _Completion:
    text: str
    token_ids: list[int]


@dataclass
class _RequestOutput:
    outputs: list[_Completion]


@dataclass
class FakeLLM:
    """Stands in for `vllm.LLM`: `collective_rpc`, `reset_prefix_cache`, `generate`."""

    worker: FakeGpuWorker
    replies: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self.calls.append(("collective_rpc", (method, args)))
        return [getattr(self.worker, method)(*args)]  # one worker: tensor parallel size 1

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache", None))
        return True

    def generate(self, prompts: list[str], sampling_params: Any, use_tqdm: bool = True) -> list[_RequestOutput]:
        self.calls.append(("generate", (list(prompts), sampling_params, use_tqdm)))
        out = []
        for prompt in prompts:
            text = self.replies[prompt]
            out.append(_RequestOutput([_Completion(text, list(range(len(text.split()))))]))
        return out


@pytest.fixture
def tiny(tiny_model_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path)


@pytest.fixture
def weight_file(tiny, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A save_weights file of perturbed tiny weights, and the tensors it holds."""
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_config(tiny.config)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    path = save_weights(trained, tmp_path / "step-10.safetensors")
    from safetensors.torch import load_file

    return path, load_file(str(path))


def make_backend(tiny, replies: dict[str, str] | None = None) -> tuple[VllmBackend, FakeLLM, VllmStyleModel]:
    model = VllmStyleModel(tiny)
    llm = FakeLLM(FakeGpuWorker(model), replies or {})
    params = object()  # opaque to the adapter: it is only passed back to generate
    return VllmBackend(llm, params, "cuda:0"), llm, model


def test_weights_are_swapped_in_place_then_prefix_cache_reset(tiny, weight_file) -> None:
    path, saved = weight_file
    backend, llm, model = make_backend(tiny)
    backend.load_weights(str(path))
    assert [c[0] for c in llm.calls] == ["collective_rpc", "reset_prefix_cache"]
    assert llm.calls[0][1] == (LOAD_METHOD, (str(path),))  # only the path crosses the RPC
    assert sorted(model.loaded) == sorted(saved)
    state = tiny.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor)


def test_missing_file_fails_before_touching_the_engine(tiny, tmp_path: Path) -> None:
    backend, llm, _ = make_backend(tiny)
    with pytest.raises(FileNotFoundError, match="checkpoint file missing"):
        backend.load_weights(str(tmp_path / "absent.safetensors"))
    assert llm.calls == []


def test_corrupt_file_is_a_clear_error_and_cache_is_kept(tiny, weight_file, tmp_path: Path) -> None:
    path, _ = weight_file
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    backend, llm, _ = make_backend(tiny)
    with pytest.raises(ValueError, match=f"checkpoint file unreadable: {corrupt}"):
        backend.load_weights(str(corrupt))
    assert [c[0] for c in llm.calls] == ["collective_rpc"]


def test_generate_keeps_order_cuts_at_stop_and_counts_tokens(tiny) -> None:
    replies = {"p1": "a b </think> <answer>1</answer> junk", "p2": "c </think> <answer>2</answer>", "p3": "no answer"}
    backend, llm, _ = make_backend(tiny, replies)
    out = backend.generate(["p3", "p1", "p2"])
    assert [g.text for g in out] == ["no answer", "a b </think> <answer>1</answer>", "c </think> <answer>2</answer>"]
    assert [g.num_tokens for g in out] == [2, 5, 3]
    name, (prompts, params, use_tqdm) = llm.calls[-1]
    assert (name, prompts, params, use_tqdm) == ("generate", ["p3", "p1", "p2"], backend.sampling_params, False)


def test_sampling_is_greedy_and_stops_at_answer() -> None:
    assert sampling_kwargs(64) == {"temperature": 0.0, "max_tokens": 64, "stop": [STOP], "include_stop_str_in_output": True}


def test_visible_devices_follow_the_parents_numbering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_devices("cuda:1") == "1"
    assert _visible_devices("cuda") == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert _visible_devices("cuda:1") == "6"


def test_worker_evaluates_through_the_vllm_adapter(tiny, weight_file) -> None:
    path, _ = weight_file
    replies = {"q1 <think>": " 1+1 </think> <answer>2</answer>", "q2 <think>": " </think> <answer>5</answer> more", "q3 <think>": "rambling"}
    backend, _, _ = make_backend(tiny, replies)
    spec = WorkerSpec(
        model_path="unused", backend="vllm", device="cuda:0",
        problems=[("q1 <think>", "2"), ("q2 <think>", "4"), ("q3 <think>", "1")],
        max_new_tokens=16, batch_size=4, num_examples=2, grading_timeout_s=2.0,
        gpu_memory_utilization=0.5, parent_pid=0,
    )
    job = {"job": 3, "run": "trial-7", "step": 40, "examples_seen": 320, "path": str(path)}
    result = evaluate(backend, spec, job)
    assert result["status"] == "ok"
    assert (result["correct"], result["wrong_answer"], result["format_failure"]) == (1, 1, 1)
    assert result["accuracy"] == pytest.approx(1 / 3) and result["format_accuracy"] == pytest.approx(2 / 3)
    assert result["examples"][1] == {"prompt": "q2 <think>", "response": " </think> <answer>5</answer>", "answer": "4", "category": "wrong_answer"}
    bad = evaluate(backend, spec, {**job, "path": str(path) + ".gone"})
    assert bad["status"] == "error" and "checkpoint file missing" in bad["error"]


@pytest.mark.gpu
def test_real_vllm_swaps_weights(tiny_model_path: str, weight_file) -> None:
    """Where vLLM and a GPU exist: build the engine once, swap weights, generate."""
    pytest.importorskip("vllm")
    path, _ = weight_file
    backend = VllmBackend.load(tiny_model_path, "cuda:0", max_new_tokens=8, gpu_memory_utilization=0.3)
    first = backend.generate(["Question: 1 plus 1? <think>"])
    backend.load_weights(str(path))
    second = backend.generate(["Question: 1 plus 1? <think>"])
    assert len(first) == len(second) == 1 and 0 < second[0].num_tokens <= 8
    assert first != second  # different weights, different greedy answer
