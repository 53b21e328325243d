"""One W&B run per training run or trial, that tells the truth about it.

- Its config is the run's effective config (every section, after the example budget and the
  search space were applied), plus what the caller adds (the study, the trial, its params).
- Its summary holds the values at the run's best evaluation (the ones study_results.yaml
  records), not the last ones logged.
- Its state (complete, pruned at N examples, failed and why) is in the summary and the tags.

The run is created with `wandb.init` and handed to Lightning's WandbLogger (`experiment=`):
Lightning's own call passes `anonymous=None`, which wandb 0.2x+ warns about on every run.
Metrics are logged at the optimizer steps done (SFTModule logs a `step`), the step the
evaluator's figures, `best_step` and the summary use.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

log = logging.getLogger(__name__)

STATES = ("complete", "pruned", "failed")


class RunLogger(WandbLogger):
    """Lightning's WandbLogger, with the config left as `wandb.init` got it.

    The Trainer also logs SFTModule's and SFTDataModule's init arguments as flat keys beside the
    nested sections; they repeat the sections, and contradict them where train() filled a value
    in (`tokenizer_name_or_path`: the cache path against `data.tokenizer_name_or_path: null`) or
    a key of the same name lives in two sections (`gradient_clip_val`, model and trainer).
    """

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    @override
    def log_metrics(self, metrics: dict[str, Any], step: int | float | None = None) -> None:
        # SFTModule's `step` arrives as a float (Lightning logs floats); the evaluator's as an int.
        super().log_metrics(metrics, step=None if step is None else int(step))


def make_logger(wandb_cfg: dict[str, Any], run_name: str | None, params: dict[str, Any]):
    """A W&B logger (offline unless configured), or False when disabled."""
    if not wandb_cfg.get("enabled", True) or wandb_cfg.get("mode") == "disabled":
        return False
    import wandb

    save_dir = Path(wandb_cfg["save_dir"])
    save_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=wandb_cfg["project"], entity=wandb_cfg.get("entity"), group=wandb_cfg.get("group"),
        name=run_name or wandb_cfg.get("name"), tags=wandb_cfg.get("tags"), dir=str(save_dir),
        mode=wandb_cfg["mode"], config=params, reinit="create_new",
    )
    return RunLogger(experiment=run, save_dir=str(save_dir))


def finish(logger: Any, summary: dict[str, Any], state: str) -> None:
    """Write the best-evaluation summary and the run's state, then close the run."""
    if not logger or not hasattr(logger, "experiment"):
        return
    try:
        run = logger.experiment
        run.summary.update({k: v for k, v in summary.items() if v is not None})
        run.summary["state"] = state
        run.tags = tuple(dict.fromkeys([*(run.tags or ()), state]))
        run.finish(exit_code=1 if state == "failed" else 0)
    except Exception as err:  # a logging hiccup must not lose the run's results
        log.warning("W&B finish failed: %s", err)


def best_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of the run's best evaluation, under the names they were logged with."""
    keys = ("eval/loss", "eval/accuracy", "eval/format_accuracy", "eval/correct", "eval/wrong_answer",
            "eval/format_failure", "eval/mean_response_length")
    out = {k: result[k] for k in keys if k in result}
    out.update(
        objective=result.get("objective"), best_step=result.get("best_step"),
        best_examples_seen=result.get("best_examples_seen"), examples_seen=result.get("examples_seen"),
        global_step=result.get("global_step"), stopped_early=result.get("stopped_early"),
    )
    if result.get("accuracy_ci"):
        out["eval/accuracy_ci_low"], out["eval/accuracy_ci_high"] = result["accuracy_ci"]
    return out
