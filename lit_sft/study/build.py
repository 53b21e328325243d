"""Building the study from the config: sampler (TPE reseeded per trial), pruner (ASHA at
examples seen), storage, and the checks a resumed study must pass."""

from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from lit_sft import secrets
from lit_sft import storage as storage_mod
from lit_sft.errors import UserError
from lit_sft.pruner import TolerantSuccessiveHalvingPruner
from lit_sft.search_space import SearchSpace
from lit_sft.study import budget as budget_mod
from lit_sft.study.config import StudyConfig


def default_min_resource(cfg: dict[str, Any], space: SearchSpace, reduction_factor: int = 3) -> int:
    """The first rung when `study.pruner.min_resource` is null.

    With an example budget R per trial (`budget.examples`): R / reduction_factor^2, so the rungs
    are R/9, R/3 and R at a factor of 3, and a configuration costs about a quarter of a full
    trial on average. Every trial is evaluated at the first step at or past each rung
    (Objective.trial_config), whatever its batch size.

    Without one: the examples the largest-batch trial has seen at its first evaluation. Reports
    are made at every evaluation, i.e. every `val_check_interval * batch_size` examples, so a
    smaller first rung would be judged on different amounts of data.
    """
    budget = cfg.get("budget") or {}
    if budget.get("examples"):
        return budget_mod.first_rung(int(budget["examples"]), reduction_factor)
    every = budget.get("eval_every_examples")
    if every:
        return int(every)
    interval = cfg["trainer"].get("val_check_interval")
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise UserError(
            f"study.pruner.min_resource: cannot derive it from trainer.val_check_interval={interval!r} "
            "(an epoch fraction or none); set study.pruner.min_resource (in examples seen)"
        )
    batch = space.by_key("data.batch_size")
    largest = batch.largest if batch is not None else cfg["data"]["batch_size"]
    return int(interval * largest)


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random state is reset from (seed, trial number) at the start of every trial.

    One seed per process would make workers started together propose the same first random
    points; a seed per trial number (numbers are handed out by the storage, unique across
    workers and restarts) keeps them apart, makes a resumed study propose new points, and
    keeps a one-worker study reproducible. TPESampler can only reseed from OS entropy
    (`reseed_rng`), hence the two private attributes; should Optuna rename them, that is the
    fallback.
    """

    def __init__(self, *, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _reseed(self, self._random_sampler, self._base_seed + trial.number)
        super().before_trial(study, trial)


def _reseed(sampler: optuna.samplers.BaseSampler, inner: optuna.samplers.BaseSampler, seed: int) -> None:
    """Seed `sampler` and the random sampler it falls back on (private `_rng`; OS entropy if renamed)."""
    try:
        sampler._rng.rng.seed(seed % 2**32)
        inner._rng.rng.seed(seed % 2**32)
    except AttributeError:
        sampler.reseed_rng()


class TrialSeededGPSampler(optuna.samplers.GPSampler):
    """GPSampler reset from (seed, trial number) at the start of every trial, for the reasons of
    TrialSeededTPESampler. Its start-up points come from a RandomSampler seeded the same way, so
    they are the points TPE's start-up would draw: a GP study and a TPE study of one seed begin
    alike (bench/search_efficiency.py pairs them with random search that way).

    `use_pruned`: Optuna's GPSampler fits on complete trials only, and counts only those towards
    its start-up; under ASHA, where most trials are pruned, it stays random. With this, a pruned
    trial counts as complete with the last value it reported (the value the pruner judged it
    on), a pessimistic stand-in for its final value, as a pruned trial is one that was worse
    than the others at its rung.
    """

    def __init__(self, *, seed: int, use_pruned: bool = False, **kwargs: Any) -> None:
        super().__init__(seed=seed, independent_sampler=optuna.samplers.RandomSampler(seed=seed), **kwargs)
        self._base_seed = seed
        self._use_pruned = use_pruned

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        _reseed(self, self._independent_sampler, self._base_seed + trial.number)
        super().before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return super().infer_relative_search_space(_PrunedAsComplete(study) if self._use_pruned else study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return super().sample_relative(_PrunedAsComplete(study) if self._use_pruned else study, trial, search_space)


class _PrunedAsComplete:
    """A view of a study in which each pruned trial with a finite report is a complete trial
    valued at its last report. Everything else is the study's."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states, use_cache=False)

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False) -> list[FrozenTrial]:
        wanted = None if states is None else set(states)
        asked = None if wanted is None else wanted | ({TrialState.PRUNED} if TrialState.COMPLETE in wanted else set())
        out = []
        for trial in self._study._get_trials(deepcopy=False, states=tuple(asked) if asked else None, use_cache=use_cache):
            if trial.state == TrialState.PRUNED:
                last = _last_report(trial)
                if last is None:
                    continue
                trial = copy.copy(trial)  # the storage's object stays as it is
                trial.state = TrialState.COMPLETE
                trial.values = [last]
            if wanted is None or trial.state in wanted:
                out.append(trial)
        return out


def _last_report(trial: FrozenTrial) -> float | None:
    if not trial.intermediate_values:
        return None
    value = trial.intermediate_values[max(trial.intermediate_values)]
    return value if math.isfinite(value) else None


def make_sampler(study_cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    s = study_cfg.sampler
    with warnings.catch_warnings():
        # multivariate TPE is marked experimental; it has been stable since Optuna 2.2. GPSampler's
        # deterministic_objective is marked experimental too (since Optuna 3.6).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if s.kind == "gp":
            return TrialSeededGPSampler(
                seed=study_cfg.seed,
                use_pruned=s.gp_use_pruned,
                n_startup_trials=s.n_startup_trials,
                deterministic_objective=s.deterministic_objective,
                # every parameter of a fixed space is modelled; a warning per trial would be noise
                warn_independent_sampling=False,
            )
        return TrialSeededTPESampler(
            seed=study_cfg.seed,
            n_startup_trials=s.n_startup_trials,
            n_ei_candidates=s.n_ei_candidates,
            constant_liar=s.constant_liar,
            multivariate=s.multivariate,
        )


def make_pruner(study_cfg: StudyConfig, cfg: dict[str, Any], space: SearchSpace) -> optuna.pruners.BasePruner:
    p = study_cfg.pruner
    if not p.enabled:
        return optuna.pruners.NopPruner()
    return TolerantSuccessiveHalvingPruner(
        min_resource=p.min_resource or default_min_resource(cfg, space, p.reduction_factor),
        reduction_factor=p.reduction_factor,
        min_early_stopping_rate=p.min_early_stopping_rate,
        tolerance=p.tolerance,
    )


def open_study(study_cfg: StudyConfig, cfg: dict[str, Any], space: SearchSpace, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it (same name and storage) to resume or join it."""
    study = storage_mod.load_or_create(
        storage, study_cfg.name, study_cfg.direction, sampler=make_sampler(study_cfg), pruner=make_pruner(study_cfg, cfg, space),
    )
    if study.direction.name.lower() != study_cfg.direction:
        raise UserError(
            f"study.direction: study {study_cfg.name!r} in {secrets.mask_url(study_cfg.storage_url)} was created to "
            f"{study.direction.name.lower()}, not {study_cfg.direction}; use another study.name"
        )
    _check_same_space(study, space)
    if study_cfg.baseline_trial and not study.get_trials(deepcopy=False):
        enqueue_baseline(study, space, cfg)
    if study.metric_names != [study_cfg.metric]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([study_cfg.metric])  # optuna-dashboard's axis label, not "Objective 0"
    return study


def enqueue_baseline(study: optuna.Study, space: SearchSpace, cfg: dict[str, Any]) -> None:
    """The config's own hyperparameters as the study's first trial (called under the study lock,
    on a study without trials, so one worker of several enqueues it)."""
    params, moved = budget_mod.baseline_params(space, cfg)
    attrs: dict[str, Any] = {budget_mod.BASELINE_ATTR: True}
    if moved:
        attrs[budget_mod.MOVED_ATTR] = moved
    study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True)


def _check_same_space(study: optuna.Study, space: SearchSpace) -> None:
    """A resumed study must search the same names, normalised the same way: the sampler models
    trials by parameter name, and a learning rate searched plainly and one searched normalised
    by batch size are different quantities under one name."""
    names = set(space.names)
    scales = space.scales()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if set(trial.params) != names:
            raise UserError(
                f"study.search_space: study {study.study_name!r} already has trials over "
                f"{sorted(trial.params)}, but {space.path} defines {sorted(names)}; use another study.name"
            )
        recorded = trial.user_attrs.get("param_scales") or {}
        if recorded != scales:
            def said(s: dict[str, str]) -> str:
                return "; ".join(s.values()) if s else "no normalised entry"
            raise UserError(
                f"study.search_space: study {study.study_name!r} was searched with {said(recorded)}, but {space.path} "
                f"has {said(scales)}; use another study.name"
            )


def results_dir_problem(study_cfg: StudyConfig) -> str | None:
    """A results folder that holds another study's report or best model would have them
    overwritten (or left beside this study's report, as if they were this study's)."""
    import json

    import yaml

    path = study_cfg.results_path
    owners = []
    try:
        owners.append(("study_results.yaml", (yaml.safe_load((path / "study_results.yaml").read_text()) or {}).get("study")))
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    try:
        owners.append(("best_model/lit_sft_trial.json", json.loads((path / "best_model" / "lit_sft_trial.json").read_text()).get("study")))
    except (OSError, ValueError, AttributeError):
        pass
    for file, owner in owners:
        if owner is not None and owner != study_cfg.name:
            return (f"study.results_dir: {path} holds the results of study {owner!r} ({file}); give study "
                    f"{study_cfg.name!r} a folder of its own (null = results/optuna/<study.name>), or use "
                    f"--study.name {owner} to resume that one")
    return None


def prepare_results_dir(study_cfg: StudyConfig) -> None:
    path = study_cfg.results_path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"study.results_dir: cannot create {path}: {err.strerror or err}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"study.results_dir: cannot write to {path}")


