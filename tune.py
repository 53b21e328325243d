"""Tune SFT hyperparameters: python tune.py [--config configs/tune.yaml] [--study.n_trials 5] [overrides]

Same config format and dotted overrides as train.py, plus the `study:` section. Without
--config the embedded default (configs/tune.yaml: tiny model, generated data, CPU) runs. The
work is lit_sft.study.run.tune(cfg).
"""

from __future__ import annotations

import sys
from lit_sft.cli import run_cli


def main(argv: list[str]) -> int:
    from lit_sft.config import parse
    from lit_sft.study.run import tune

    summary = tune(parse(argv, tune=True))  # no --config: configs/tune.yaml (lit_sft.config.DEFAULT_CONFIGS)
    if not summary["counts"].get("complete"):
        # A study with no complete trial has no result: a script or CI step must not read it as one.
        counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items()) or "no trials"
        print(f"error: study {summary['study']} has no complete trial ({counts}); see {summary.get('report_file')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
