"""Tune SFT hyperparameters: python tune.py [--config configs/tune.yaml] [--study.n_trials 5] [overrides]

Same config format and dotted overrides as train.py, plus the `study:` section. Without
--config the embedded default (configs/tune.yaml: tiny model, generated data, CPU) runs. The
work is lit_sft.study.run.tune(cfg).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lit_sft.cli import run_cli

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tune.yaml"


def main(argv: list[str]) -> int:
    from lit_sft.config import parse
    from lit_sft.study.run import tune

    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        argv = ["--config", str(DEFAULT_CONFIG), *argv]
    tune(parse(argv, tune=True))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
