"""Generation backends of the evaluator: transformers `generate` (anywhere) and vLLM (GPU extra).

Both keep one model resident for the whole study and swap checkpoint weights into it in place;
building a model (and, for vLLM, its CUDA graphs and KV cache) costs far more than a swap.
"""

from __future__ import annotations

import os
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
    num_tokens: int
    """Generated tokens up to and including the stop (the response length)."""


class Backend(Protocol):
    """What the worker needs from a generation engine."""

    name: str
    device: str

    def load_weights(self, path: str) -> None:
        """Load a `save_weights` file into the resident model; FileNotFoundError/ValueError if bad."""

    def generate(self, prompts: Sequence[str]) -> list[Generation]:
        """Greedy responses, one per prompt, in the prompts' order."""


def truncate_at_stop(text: str) -> str:
    """`text` up to and including the first `</answer>`."""
    end = text.find(STOP)
    return text if end < 0 else text[: end + len(STOP)]


def check_weights_file(path: str | Path) -> Path:
    """The path if it is a file; the same FileNotFoundError `load_weights_into` gives otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    return path


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

    def __init__(self, model: Any, tokenizer: Any, device: str, max_new_tokens: int, batch_size: int) -> None:
        from transformers import GenerationConfig

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
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

        load_weights_into(self.model, path)

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

    def _generate_batch(self, prompts: list[str]) -> list[Generation]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        output = self.model.generate(**enc, generation_config=self.generation_config, tokenizer=self.tokenizer)
        new = output[:, enc["input_ids"].shape[1] :]
        # Rows that stopped early are filled with pad tokens; the response ends at the first one.
        done = (new == self.generation_config.pad_token_id).int().cumsum(dim=1) > 0
        counts = (~done).sum(dim=1).tolist()
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [Generation(truncate_at_stop(t), int(n)) for t, n in zip(texts, counts, strict=True)]


# ------------------------------------------------------------------------------------------------
# vLLM
# ------------------------------------------------------------------------------------------------

WORKER_EXTENSION = "lit_sft.evaluator.backends.WeightFileLoader"
LOAD_METHOD = "lit_sft_load_weights"


class WeightFileLoader:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`): loads a weight file in place.

    It runs where the model lives (in this process or vLLM's engine process), so only the file
    path crosses `collective_rpc`, never the tensors.
    """

    model_runner: Any  # set by vLLM's worker, which this class is mixed into

    def lit_sft_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        # The model's own `load_weights` maps plain HF names onto vLLM's fused layers (qkv_proj,
        # gate_up_proj) and skips lm_head when embeddings are tied, as save_weights writes them.
        state = load_file(path)
        self.model_runner.model.load_weights(weights=state.items())
        return len(state)


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


class VllmBackend:
    """vLLM `LLM` built once; weights swapped in place through the worker extension."""

    name = "vllm"

    def __init__(self, llm: Any, sampling_params: Any, device: str) -> None:
        self.llm = llm
        self.sampling_params = sampling_params
        self.device = device

    @classmethod
    def load(cls, model_path: str, device: str, max_new_tokens: int, gpu_memory_utilization: float) -> VllmBackend:
        # vLLM takes the whole visible GPU set; pin it to ours before anything initialises CUDA.
        os.environ["CUDA_VISIBLE_DEVICES"] = _visible_devices(device)
        # Keep the engine in this process: when the worker exits (or is killed with its parent)
        # no engine-core process is left behind holding GPU memory.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, SamplingParams

        llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype="auto",
            seed=0,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=WORKER_EXTENSION,
        )
        return cls(llm, SamplingParams(**sampling_kwargs(max_new_tokens)), device)

    def load_weights(self, path: str) -> None:
        path = check_weights_file(path)
        try:
            loaded = self.llm.collective_rpc(LOAD_METHOD, args=(str(path),))
        except Exception as err:
            raise ValueError(f"checkpoint file unreadable: {path}: {type(err).__name__}: {err}") from err
        if not loaded or not all(loaded):
            raise ValueError(f"checkpoint file {path}: no tensors loaded ({loaded})")
        # Cached prefixes hold KV computed with the previous weights; reusing them would mix models.
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[str]) -> list[Generation]:
        outputs = self.llm.generate(list(prompts), self.sampling_params, use_tqdm=False)
        generations = []
        for request in outputs:
            completion = request.outputs[0]
            generations.append(Generation(truncate_at_stop(completion.text), len(completion.token_ids)))
        return generations


def create_backend(
    name: str,
    model_path: str,
    device: str,
    *,
    max_new_tokens: int,
    batch_size: int,
    gpu_memory_utilization: float,
) -> Backend:
    """The resolved backend, its model loaded on `device`."""
    if name == "vllm":
        return VllmBackend.load(model_path, device, max_new_tokens, gpu_memory_utilization)
    if name == "transformers":
        return TransformersBackend.load(model_path, device, max_new_tokens, batch_size)
    raise ValueError(f"unknown evaluator backend {name!r}")
