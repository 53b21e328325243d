"""One config format for train.py and tune.py: Lightning's argument parser over typed signatures.

`LightningArgumentParser` is the parser LightningCLI is built on, so configs, dotted overrides
(`--model.learning_rate 1e-5`), `--print_config` and `--help` behave as Lightning users expect;
we stop short of LightningCLI's own `run` because the work must live in `train(cfg)`, which the
tuner calls once per trial with callbacks of its own.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lit_sft.config_help import document_trainer
from lit_sft.config_keys import check_keys
from lit_sft.errors import UserError

TRAINER_SKIP = {"callbacks", "logger", "plugins"}

TRAINER_DEFAULTS = {
    "trainer.max_steps": 300,
    "trainer.max_epochs": -1,
    "trainer.val_check_interval": 25,
    "trainer.check_val_every_n_epoch": None,
    "trainer.num_sanity_val_steps": 0,
    "trainer.enable_checkpointing": False,
    "trainer.log_every_n_steps": 5,
    "trainer.accelerator": "auto",
    "trainer.devices": 1,
}


@dataclass
class EarlyStoppingConfig:
    """Lightning's EarlyStopping on the objective."""

    enabled: bool = True
    """Stop a run once `monitor` stops improving (tune.py: in every trial)."""
    monitor: str = "eval/loss"
    """Metric watched at each evaluation; tune.py sets it to study.metric in every trial."""
    mode: str = "min"
    """min: a lower `monitor` is better; max: a higher one. tune.py follows study.direction."""
    patience: int = 3
    """Evaluations without an improvement of at least `min_delta` before stopping."""
    min_delta: float = 0.001
    """Smallest change of `monitor` that counts as an improvement."""


@dataclass
class WandbConfig:
    """Weights & Biases logging: one run per training run or trial."""

    enabled: bool = True
    """Log each run (each trial) as a W&B run; false: no W&B at all."""
    project: str = "math-sft-optuna-asha"
    """W&B project the runs belong to."""
    mode: str = "offline"
    """offline (default: nothing leaves the machine; `wandb sync` later), online, or disabled."""
    save_dir: str = "results/wandb"
    """Folder of the run files (offline runs: save_dir/wandb/offline-run-*)."""
    entity: str | None = None
    """W&B team or user to log under; null = your default entity (online mode)."""
    group: str | None = None
    """Run group; null = `train` for train.py runs; tune.py always groups by study.name."""
    name: str | None = None
    """train.py: runs (and their folders) are named <name>-000, <name>-001, ...; null = run-000,
    ... tune.py names its runs trial-NNNN."""
    tags: list[str] | None = None
    """Tags of every run; the run's state (complete, pruned, failed) is added at its end."""


@dataclass
class BudgetConfig:
    """A run's length in examples instead of steps, so batch sizes compare at equal data.

    With a fixed `trainer.max_steps`, a batch-64 run sees 8x the data of a batch-8 one, while the
    pruner compares trials at equal examples seen: the large-batch trials are judged on few steps
    and the small-batch ones never get the data they need. Set here, these override
    `trainer.max_steps` and `trainer.val_check_interval` per run from `data.batch_size`.
    """

    examples: int | None = None
    """Training examples per run (per trial in tune.py): trainer.max_steps = ceil(examples /
    data.batch_size). In tune.py it is also R, the full length ASHA's rungs divide (R/9 and up)."""
    total_examples: int | None = None
    """tune.py only: the examples the whole study may train on, over all its trials, restarts and
    workers (finished trials, plus running trials' progress, as the storage has them). A new trial
    starts while fewer have been trained; running trials finish. Resume continues the same budget;
    a study whose budget is spent says so and starts nothing. null = no budget (study.n_trials caps)."""
    eval_at_examples: list[int] | None = None
    """Also evaluate at the first step at or past each of these example counts (tune.py sets them
    to its ASHA rungs, so every batch size is judged at the first step at or past each rung)."""
    eval_every_examples: int | None = None
    """Evaluate every this many examples: trainer.val_check_interval = ceil(this / data.batch_size)
    steps, so each evaluation, and each pruning rung (a multiple of it), falls at or just past its
    number of examples, never before: at batch 64 and 2,000, every 2,048 examples (rounding down
    evaluated every 1,984, which reached a rung at 4,000 only at 5,952)."""


def apply_budget(cfg: dict[str, Any], round_eval: Callable[[float], int] = math.ceil) -> dict[str, Any]:
    """`cfg` with trainer.max_steps / val_check_interval derived from the example budget, if set.

    `round_eval` rounds eval_every_examples / batch to steps; only bench/search_efficiency.py's
    before/after measurement passes another (math.floor, the behaviour before).
    """
    budget = cfg.get("budget") or {}
    if not budget.get("examples") and not budget.get("eval_every_examples"):
        return cfg
    out = copy.deepcopy(cfg)
    batch = int(out["data"]["batch_size"])
    if budget.get("examples"):
        out["trainer"]["max_steps"] = max(1, math.ceil(budget["examples"] / batch))
    if budget.get("eval_every_examples"):
        out["trainer"]["val_check_interval"] = max(1, round_eval(int(budget["eval_every_examples"]) / batch))
    return out


def eval_steps(cfg: dict[str, Any]) -> list[int]:
    """The optimizer steps of `budget.eval_at_examples`: the first step at or past each count."""
    at = (cfg.get("budget") or {}).get("eval_at_examples") or []
    batch = int(cfg["data"]["batch_size"])
    return sorted({max(1, math.ceil(int(examples) / batch)) for examples in at})


PROJECT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIGS = {False: PROJECT_CONFIGS / "sft.yaml", True: PROJECT_CONFIGS / "tune.yaml"}
"""What `train.py fit` and `tune.py` run when no --config is given: the embedded default."""


def build_parser(tune: bool = False, default_config: Path | None = None):
    """The parser of train.py (`tune=False`) or tune.py; `default_config` is read under any
    command-line values when no --config is given, and its values are the defaults --help shows."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    # The dataclasses document each key in an attribute docstring; --help shows them.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    from lit_sft.data import SFTDataModule
    from lit_sft.evaluator.config import EvaluatorConfig
    from lit_sft.module import SFTModule

    prog = "tune.py" if tune else "train.py fit"
    parser = LightningArgumentParser(prog=prog, description=__doc__, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action="config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("--seed_everything", type=int, default=0, help="Seed for torch, numpy and python random")
    parser.add_argument("--output_dir", type=str, default="results/train", help="Run artefacts: best model, weight files")
    parser.add_class_arguments(SFTModule, "model", fail_untyped=False)
    parser.add_class_arguments(SFTDataModule, "data", fail_untyped=False)
    parser.add_class_arguments(Trainer, "trainer", skip=TRAINER_SKIP, fail_untyped=False)
    parser.add_dataclass_arguments(BudgetConfig, "budget")
    parser.add_dataclass_arguments(EarlyStoppingConfig, "early_stopping")
    parser.add_dataclass_arguments(EvaluatorConfig, "evaluator")
    parser.add_dataclass_arguments(WandbConfig, "wandb")
    if tune:
        from lit_sft.study.config import StudyConfig

        parser.add_dataclass_arguments(StudyConfig, "study")
    parser.set_defaults(TRAINER_DEFAULTS)
    document_trainer(parser)
    if default_config is not None:
        parser.default_config_files = [str(default_config)]
    return parser


def parse(argv: list[str] | None = None, tune: bool = False) -> dict[str, Any]:
    """Parse CLI arguments (with `--config`) into a plain nested dict; bad input -> UserError."""
    from jsonargparse import ArgumentError

    argv = list(sys.argv[1:] if argv is None else argv)
    given = config_paths(argv)
    for path in given or [str(DEFAULT_CONFIGS[tune])]:
        check_yaml(path)
    # A --config goes on top of the embedded default (configs/tune.yaml or sft.yaml), so a partial
    # file changes only what it names; the shipped configs set every key they depend on
    # (tests/test_cli_defaults.py checks the reference configs come out the same either way).
    parser = build_parser(tune, default_config=DEFAULT_CONFIGS[tune])
    check_keys(parser, given or [str(DEFAULT_CONFIGS[tune])], argv)
    try:
        namespace = parser.parse_args(argv)
    except (ArgumentError, ValueError, TypeError) as err:
        raise UserError(_one_line(err)) from err
    cfg = namespace.as_dict()
    cfg.pop("config", None)
    cfg.pop("__default_config__", None)  # jsonargparse's note of the default config file it read
    if not tune and (cfg.get("budget") or {}).get("total_examples"):
        raise UserError("budget.total_examples: a study's budget (tune.py); train.py runs one configuration "
                        "for budget.examples")
    check(cfg)
    if any(Path(path).resolve() != DEFAULT_CONFIGS[tune] for path in given):
        base = DEFAULT_CONFIGS[tune].relative_to(PROJECT_CONFIGS.parent)
        print(f"config: {', '.join(given)} over {base} (what a file leaves out keeps {base}'s value; "
              "--print_config shows all)", flush=True)
    return cfg


def config_paths(argv: list[str]) -> list[str]:
    """The files given with --config (either `--config f` or `--config=f`)."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_yaml(path: str) -> None:
    """A config file that is not readable YAML or not a mapping, named with its line and column."""
    from lit_sft.yamlfile import read_yaml

    _, loaded = read_yaml(path, "--config")
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of sections (model:, data:, ...), got {type(loaded).__name__}")


def _one_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(err).__name__


def defaults(tune: bool = False) -> dict[str, Any]:
    """The full default config, as a dict (for code that calls train() with partial configs)."""
    cfg = build_parser(tune).get_defaults().as_dict()
    cfg.pop("config", None)
    return cfg


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`; unknown sections and keys are errors."""
    out = copy.deepcopy(base)
    unknown = []
    for key, value in override.items():
        if key not in out:
            unknown.append(key)
        elif isinstance(out[key], dict) and isinstance(value, dict):
            missing = [f"{key}.{k}" for k in value if k not in out[key]]
            unknown.extend(missing)
            out[key].update({k: v for k, v in value.items() if k in out[key]})
        else:
            out[key] = value
    if unknown:
        raise UserError(f"unknown config key(s): {', '.join(sorted(unknown))}")
    return out


def complete(cfg: dict[str, Any], tune: bool = False) -> dict[str, Any]:
    """Defaults filled in under a possibly partial config."""
    return merge(defaults(tune), cfg)


def check(cfg: dict[str, Any], *, other_rank: bool = False) -> None:
    """Every problem a config has before any work starts: ranges (lit_sft.checks), cross-section
    rules a per-field type check cannot see, missing files, and the first bad record of each data
    source (read, not tokenized: no model or tokenizer loads); all collected, raised once.

    `other_rank`: the config of a rank > 0 of a multi-process trial, whose evaluator is rank 0's.
    """
    from lit_sft.checks import range_problems

    problems = range_problems(cfg)
    trainer, data = cfg["trainer"], cfg["data"]
    if trainer.get("accumulate_grad_batches", 1) not in (1, None):
        problems.append("trainer.accumulate_grad_batches: use data.micro_batch_size (accumulation is exact and built in)")
    if trainer.get("gradient_clip_val") is not None:
        problems.append("trainer.gradient_clip_val: use model.gradient_clip_val (manual optimization clips itself)")
    from lit_sft.data import column_map_problems, data_problems
    from lit_sft.sources import spec_problem

    missing = [p for p in (spec_problem(data[k], f"data.{k}") for k in ("train_path", "validation_path", "test_path") if data.get(k)) if p]
    problems.extend(missing)
    maps = column_map_problems(data)
    problems.extend(maps)
    problems.extend(_section_problems(cfg))
    if not other_rank:
        problems.extend(objective_problems(cfg))
    if not missing and not maps:
        # Read with the config's own problems, so one run reports both (a fix-and-rerun per problem is slow).
        problems.extend(data_problems(cfg))
    if problems:
        raise UserError("; ".join(problems))


def _section_problems(cfg: dict[str, Any]) -> list[str]:
    """The evaluator and study sections, checked by the dataclasses that will hold them."""
    from lit_sft.evaluator.config import EvaluatorConfig

    problems = []
    sections = [(EvaluatorConfig, cfg.get("evaluator"))]
    if cfg.get("study") is not None:
        from lit_sft.study.config import StudyConfig

        sections.append((StudyConfig.from_dict, cfg["study"]))
    for build, values in sections:
        if values is None:
            continue
        try:
            build(**values) if build is EvaluatorConfig else build(values)
        except UserError as err:
            problems.append(str(err))
        except TypeError as err:
            problems.append(str(err))
    return problems


def objective_problems(cfg: dict[str, Any]) -> list[str]:
    """A metric to watch must be one this configuration logs (a misspelling would otherwise
    train a whole run before Lightning's EarlyStopping complains), and an evaluator metric needs
    the evaluator that returns it."""
    from lit_sft.metrics import EVALUATOR_FIGURES, VALIDATION_METRICS, is_late

    watched = [("early_stopping.monitor", (cfg.get("early_stopping") or {}).get("monitor"))]
    if cfg.get("study"):
        watched.append(("study.metric", cfg["study"].get("metric")))
    enabled = (cfg.get("evaluator") or {}).get("enabled", True)
    logged = [*VALIDATION_METRICS, *(f"eval/{figure}" for figure in EVALUATOR_FIGURES)]
    problems = []
    for key, metric in watched:
        if not metric:
            continue
        if metric not in logged:
            import difflib

            close = difflib.get_close_matches(metric, logged, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            problems.append(f"{key}: {metric!r} is not a metric a run logs at its evaluations "
                            f"(those are {', '.join(logged)}){hint}")
        elif is_late(metric) and not enabled:
            problems.append(f"{key}: {metric} comes from the evaluator; set evaluator.enabled: true (or use eval/loss)")
    return problems
