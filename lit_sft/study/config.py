"""The `study:` section of a tune config: what to search, how to sample and prune, where to store.

Plain dataclasses, so `lit_sft.config.build_parser(tune=True)` turns them into typed, documented
CLI options (`--study.n_trials 5`, `--study.pruner.reduction_factor 4`) and the tuner rebuilds
them from the parsed dict with `StudyConfig.from_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lit_sft.errors import UserError
from lit_sft.storage import url_problem

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS_ROOT = Path("results/optuna")
"""Where a study's folder goes when study.results_dir is null: results/optuna/<study.name>."""


@dataclass
class SamplerConfig:
    """The sampler (seeded with `study.seed`, reseeded with seed + trial number before each trial)."""

    kind: Literal["tpe", "gp"] = "tpe"
    """tpe: Optuna's TPESampler, which also learns from pruned trials (ranked below the complete
    ones, by how far they got). gp: Optuna's GPSampler (Gaussian process, logEI), which fits on
    complete trials only, so under ASHA it stays random until n_startup_trials trials have run to
    the end (docs/BENCHMARKS.md, search efficiency)."""
    n_startup_trials: int = 3
    """Trials sampled at random before TPE (or GP) models the space (tpe: complete or pruned
    trials count; gp: complete trials only). On the embedded task, 3 of 12 found clearly better models than 5
    of 12 for the same examples (docs/BENCHMARKS.md)."""
    constant_liar: bool = True
    """tpe: treat running trials as bad so parallel workers do not all propose the same point."""
    multivariate: bool = True
    """tpe: model the parameters jointly (learning rate and batch size interact), not one by one."""
    n_ei_candidates: int = 24
    """tpe: candidates drawn from the model of the good trials per proposal; the one with the best
    ratio of good to bad density is tried (Optuna's default 24)."""
    gp_use_pruned: bool = False
    """gp: let pruned trials count, each valued at the last value it reported (the one the pruner
    judged). Optuna's GPSampler alone ignores them."""
    deterministic_objective: bool = False
    """gp: fit the Gaussian process without observation noise. Training on CPU or GPU is not bit
    for bit repeatable, so false."""


@dataclass
class PrunerConfig:
    """ASHA: optuna.pruners.SuccessiveHalvingPruner. Its resource is examples seen."""

    enabled: bool = True
    """Prune: stop a trial at a rung where it is not among the best 1/reduction_factor so far.
    false: every trial runs until its budget ends or early stopping stops it."""
    min_resource: int | None = None
    """Examples seen at the first rung. null = trainer.val_check_interval x the largest batch size
    in the search space: the examples the largest-batch trial has seen at its first evaluation, so
    every trial has been evaluated at least once by each rung and rungs compare equal data."""
    reduction_factor: int = 3
    """Rung k sits at min_resource x reduction_factor^k examples; about 1/reduction_factor of the
    trials reaching a rung go on past it."""
    min_early_stopping_rate: int = 0
    """Skip this many rungs before the first pruning decision."""
    tolerance: float = 0.05
    """A trial within this fraction of a rung's promotion cutoff counts as tied with it and goes
    on (lit_sft/pruner.py). 0 = Optuna's SuccessiveHalvingPruner exactly. On the embedded task
    0.05 kept random search's best trial from being pruned (bench/search_efficiency.py)."""


@dataclass
class StudyConfig:
    """One Optuna study: TPE proposes, ASHA prunes, every trial is one `train(cfg)`."""

    n_trials: int | None = 20
    """A cap on the trials in the study in total, over restarts and parallel workers (not per
    process): every complete, pruned, failed or running trial counts, except a failure that was
    retried (its retry counts instead). null = no cap: budget.total_examples (or timeout_s) ends
    the study. Rerun with a larger cap or budget to extend a finished study."""
    name: str = "lit-sft"
    """Study name in the storage; also the W&B group and the key of per-trial files."""
    storage: str | None = None
    """Optuna storage URL: sqlite:///file.db (workers on one machine), postgresql://user@host/db
    (workers on several machines; pip install -e '.[postgres]'), or journal:///file.log.
    null = sqlite file results_dir/optuna.db. Its password is masked in everything written."""
    results_dir: str | None = None
    """study_results.yaml, REPORT.md, plots/, best_model/ and per-trial files
    (trials/<study>/trial-NNNN/). null = results/optuna/<study.name>, a folder per study, so a
    second study never overwrites the first one's report or best model. A folder given here is
    used as given; one that holds another study's results is refused."""
    seed: int = 0
    """Sampler seed. The sampler is reseeded with seed + trial number before each trial, so a
    resumed study proposes new points and workers started together propose different ones."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether a lower `metric` is better (minimize, for eval/loss) or a higher one (maximize,
    for eval/accuracy); early stopping and pruning follow it."""
    metric: str = "eval/loss"
    """Objective: a metric logged at each evaluation; a trial's value is its best, not its last.
    Early stopping and pruning watch it too."""
    search_space: str = "configs/search_space.yaml"
    """YAML mapping each hyperparameter to its range and the dotted config key it sets."""
    timeout_s: float | None = None
    """Stop starting new trials after this many seconds of this process (running trials finish).
    It counts per process, from its start: a resumed study gets the full time again, and each of
    several workers stops on its own clock. For a limit on the whole study use
    budget.total_examples. null = no limit."""
    baseline_trial: bool = True
    """Enqueue the config's own hyperparameters (the values at the search space's keys) as the
    study's first trial, run in full (never pruned), so the report can say how much better the
    best trial is than what you had. A value outside the space takes the nearest value in it
    (the nearest choice, or the range clipped), and the report says so."""
    heartbeat_interval_s: int | None = 60
    """RDB storages (sqlite, postgresql): a running trial's heartbeat; a trial silent for 3
    intervals (its worker died, on any machine) is marked FAIL and retried when a worker next
    starts a trial. Workers of this machine that died are noticed at once, heartbeat or not.
    null disables the heartbeat."""
    max_retries: int = 2
    """A trial whose worker died or was interrupted is queued again with the same parameters, up
    to this many times; only its last run counts towards n_trials. 0 = never retry."""
    save_best_model: bool = True
    """Keep the best trial's best weights (save_pretrained + tokenizer) in results_dir/best_model."""
    plots: bool = True
    """Draw the PNG plots into results_dir/plots/ at the end of the study (REPORT.md shows them)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> StudyConfig:
        """From the parsed config's `study` section; all problems collected into one UserError."""
        raw = dict(raw or {})
        problems: list[str] = []
        nested = {"sampler": SamplerConfig, "pruner": PrunerConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for key, value in raw.items():
            if key not in known:
                problems.append(f"study.{key}: unknown key (known: {', '.join(sorted(known))})")
            elif key in nested:
                sub_known = {f.name for f in fields(nested[key])}
                value = dict(value or {})
                for sub in sorted(set(value) - sub_known):
                    problems.append(f"study.{key}.{sub}: unknown key (known: {', '.join(sorted(sub_known))})")
                kwargs[key] = nested[key](**{k: v for k, v in value.items() if k in sub_known})
            else:
                kwargs[key] = value
        if problems:
            raise UserError("; ".join(problems))
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        problems = []
        if self.n_trials is not None and (not isinstance(self.n_trials, int) or self.n_trials < 1):
            problems.append(f"study.n_trials must be >= 1 or null, got {self.n_trials!r}")
        if not self.name or "/" in self.name:
            problems.append(f"study.name must be a non-empty name without '/', got {self.name!r}")
        if self.direction not in ("minimize", "maximize"):
            problems.append(f"study.direction must be minimize or maximize, got {self.direction!r}")
        if not self.metric:
            problems.append("study.metric must name a logged metric, e.g. eval/loss")
        if self.timeout_s is not None and self.timeout_s <= 0:
            problems.append(f"study.timeout_s must be > 0 or null, got {self.timeout_s}")
        if self.heartbeat_interval_s is not None and self.heartbeat_interval_s < 1:
            problems.append(f"study.heartbeat_interval_s must be >= 1 or null, got {self.heartbeat_interval_s}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            problems.append(f"study.max_retries must be >= 0, got {self.max_retries!r}")
        if self.storage is not None:
            problem = url_problem(self.storage)
            if problem:
                problems.append(problem)
        if self.sampler.kind not in ("tpe", "gp"):
            problems.append(f"study.sampler.kind must be tpe or gp, got {self.sampler.kind!r}")
        if self.sampler.n_startup_trials < 0:
            problems.append(f"study.sampler.n_startup_trials must be >= 0, got {self.sampler.n_startup_trials}")
        if not isinstance(self.sampler.n_ei_candidates, int) or self.sampler.n_ei_candidates < 1:
            problems.append(f"study.sampler.n_ei_candidates must be >= 1, got {self.sampler.n_ei_candidates!r}")
        if self.pruner.min_resource is not None and self.pruner.min_resource < 1:
            problems.append(f"study.pruner.min_resource must be >= 1 or null, got {self.pruner.min_resource}")
        if self.pruner.reduction_factor < 2:
            problems.append(f"study.pruner.reduction_factor must be >= 2, got {self.pruner.reduction_factor}")
        if not 0.0 <= self.pruner.tolerance < 1.0:
            problems.append(f"study.pruner.tolerance must be in [0, 1), got {self.pruner.tolerance}")
        if self.pruner.min_early_stopping_rate < 0:
            problems.append(f"study.pruner.min_early_stopping_rate must be >= 0, got {self.pruner.min_early_stopping_rate}")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else DEFAULT_RESULTS_ROOT / self.name

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.results_path / 'optuna.db').resolve()}"

    def search_space_path(self) -> Path:
        """Relative paths are tried from the working directory, then from the project root, so
        `python /path/to/tune.py` works from anywhere with the shipped configs."""
        path = Path(self.search_space)
        if path.exists():
            return path
        shipped = PROJECT_ROOT / path
        if not path.is_absolute() and shipped.exists():
            return shipped
        raise UserError(f"study.search_space: no such file: {self.search_space}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
