"""--help for the `trainer` section, in this project's terms.

Lightning's own help texts say "training batches" where one batch here is one optimizer step,
and give Lightning's defaults ("Default: ``50``") where TRAINER_DEFAULTS sets others; --help
shows the default that runs after each text anyway.
"""

from __future__ import annotations

import re
from typing import Any

TRAINER_HELP = {
    "max_steps": "Optimizer steps per run (one step = data.batch_size examples). budget.examples, when set, "
                 "replaces it per run: ceil(examples / data.batch_size).",
    "val_check_interval": "Evaluate (eval/loss, and the evaluator's grades) every this many optimizer steps. "
                          "budget.eval_every_examples, when set, replaces it per run: ceil(examples / data.batch_size).",
    "max_epochs": "Stop after this many passes over the training records; -1 = no limit (max_steps decides).",
    "check_val_every_n_epoch": "Keep null: evaluations follow val_check_interval (optimizer steps), across epochs.",
    "num_sanity_val_steps": "Validation batches run before training to catch errors early; 0 = none.",
    "log_every_n_steps": "Log train/loss and the learning rate every this many optimizer steps.",
    "enable_checkpointing": "Lightning's own .ckpt checkpoints; not needed: the best model is saved "
                            "with save_pretrained (train.py: <run folder>/best_model).",
    "accelerator": "cpu, gpu (cuda), or auto (a GPU where there is one).",
    "devices": "Devices per run (per trial): 1, or N for data-parallel training with strategy ddp.",
    "precision": "null = bf16-mixed on a GPU, 32-true on the CPU; or any Lightning precision (e.g. 32-true).",
    "accumulate_grad_batches": "Keep 1: gradients accumulate exactly over data.micro_batch_size "
                               "micro-batches within each optimizer step.",
    "gradient_clip_val": "Keep null: the module clips itself; set model.gradient_clip_val.",
    "gradient_clip_algorithm": "Unused: model.gradient_clip_val clips the gradient norm.",
    "default_root_dir": "null = output_dir.",
    "strategy": "auto, or ddp for data-parallel training over trainer.devices (tune.py picks ddp when devices > 1).",
    "enable_autolog_hparams": "Unused: a W&B run's config is the run's effective config, every section (lit_sft/wandb_run.py).",
    "enable_model_summary": "Print the model's layers and parameter counts at the start of each run.",
    "enable_progress_bar": "Show the per-run progress bar (steps, train/loss, eval/loss).",
}
"""One sentence per key a config sets or a user is likely to, where Lightning's is wrong here."""

_LIGHTNING_DEFAULT = re.compile(r"\s*(?:Default:\s*``[^`]*``\.?|Disabled by default \([^)]*\)\.?|Default:\s*[^.]*\.)")


def document_trainer(parser: Any) -> None:
    """Our sentence for the keys in TRAINER_HELP; Lightning's for the rest, less its defaults."""
    for action in parser._actions:  # jsonargparse has no public way to reword a class argument's help
        if not action.dest.startswith("trainer.") or action.dest.endswith(".help"):
            continue
        key = action.dest.split(".", 1)[1]
        if key in TRAINER_HELP:
            action.help = TRAINER_HELP[key]
        elif action.help:
            action.help = _LIGHTNING_DEFAULT.sub("", action.help).strip() or action.help
