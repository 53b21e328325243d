"""Out-of-process evaluator: generates answers for posted checkpoints and grades them.

`EvaluatorClient` (training side) starts one worker process (`worker.main`) per run or study;
`backends` holds the generation engines (transformers `generate`, vLLM).
"""

from lit_sft.evaluator.client import EvaluatorClient, EvaluatorWarning
from lit_sft.evaluator.config import EvaluatorConfig, resolve_backend, resolve_device

__all__ = ["EvaluatorClient", "EvaluatorConfig", "EvaluatorWarning", "resolve_backend", "resolve_device"]
