"""What train.py and tune.py share: user errors as one line and exit code 2, quiet logs."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

from lit_sft.errors import UserError


def quiet() -> None:
    """Keep the console readable: progress bars and results, not library chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_MODE", "offline")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    no_transformers_bars()


def no_transformers_bars() -> None:
    """No "Loading weights" or "Writing model shards" bar between the trial lines; a download
    from the Hub keeps its bar (transformers' switch turns off the Hub's too)."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    hub_bars_off = hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if not hub_bars_off:
        hub.enable_progress_bars()


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run `main`; a UserError becomes `error: ...` on stderr and exit code 2, no traceback."""
    quiet()
    try:
        return main(list(sys.argv[1:] if argv is None else argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
