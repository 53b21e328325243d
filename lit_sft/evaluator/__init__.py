"""Out-of-process evaluator: generates answers for posted checkpoints and grades them.

`EvaluatorClient` (training side) starts one worker process (`worker.main`) per run or study;
`backends` holds the generation engines (transformers `generate`, vLLM). With
`evaluator.address`, a `RemoteEvaluatorClient` (`remote`) posts to a shared server instead
(`server`, started with `python -m lit_sft.evaluator serve`), one engine for a whole node.
`config.place` is the one resolution of the evaluator's device and backend.
"""

from lit_sft.evaluator.client import EvaluatorClient, EvaluatorWarning
from lit_sft.evaluator.config import EvaluatorConfig, resolve_backend, resolve_device

__all__ = ["EvaluatorClient", "EvaluatorConfig", "EvaluatorWarning", "resolve_backend", "resolve_device"]
