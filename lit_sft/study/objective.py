"""One trial: sample, configure, train, record, and keep the best model."""

from __future__ import annotations

import json
import math
import shutil
import traceback
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from lit_sft import secrets
from lit_sft import storage as storage_mod
from lit_sft.config import apply_budget
from lit_sft.devices import trial_world_size
from lit_sft.errors import UserError
from lit_sft.failures import describe
from lit_sft.pruner import TolerantSuccessiveHalvingPruner
from lit_sft.search_space import SearchSpace
from lit_sft.study import budget as budget_mod
from lit_sft.study import report
from lit_sft.study.config import StudyConfig
from lit_sft.study.progress import progress_start
from lit_sft.study.ranks import Ranks
from lit_sft.training import save_pretrained, train


class TrialFailed(Exception):
    """A trial raised: it is recorded as FAIL with its error and the study goes on.

    A UserError (a bad config, which every later trial would repeat) is not turned into this,
    so it still stops the study at once.
    """



def _better(value: float, best: float, direction: str) -> bool:
    return value < best if direction == "minimize" else value > best


def _one_line(err: BaseException) -> str:
    return secrets.mask(describe(err))


def _rungs(pruner: Any, budget: int) -> list[int]:
    """Examples seen at each ASHA rung that can stop a trial of `budget` examples."""
    if not isinstance(pruner, TolerantSuccessiveHalvingPruner):
        return []
    return budget_mod.rungs(pruner.min_resource, pruner.reduction_factor, pruner.min_early_stopping_rate, budget)


class Objective:
    """Runs one trial: sample, configure, train, record, and keep the best model."""

    def __init__(self, cfg: dict[str, Any], study_cfg: StudyConfig, space: SearchSpace, evaluator: Any = None,
                 pruner: Any = None) -> None:
        self.cfg = cfg
        self.pruner = pruner
        """The study's pruner: its rungs become evaluation points of every trial."""
        self.study_cfg = study_cfg
        self.space = space
        self.evaluator = evaluator
        self.results_dir = study_cfg.results_path
        self.slots: dict[int, int] = {}
        """Trial number -> its place k in the study's count (`[k/n]`), set when it is created."""
        self.start_notes: dict[int, str] = {}
        """Trial number -> what its start line adds (the budget spent when it started)."""

    def trial_config(self, params: dict[str, Any], number: int) -> dict[str, Any]:
        """The run config of one trial: the sampled values at their keys, outputs keyed by trial."""
        cfg = self.space.apply(self.cfg, params)
        full = budget_mod.full_examples(apply_budget(cfg))
        if full is not None and _rungs(self.pruner, full):
            cfg["budget"]["eval_at_examples"] = _rungs(self.pruner, full)
        cfg = apply_budget(cfg)  # what runs: W&B logs this config
        cfg.pop("study", None)
        cfg["output_dir"] = str(report.trial_dir(self.results_dir, self.study_cfg.name, number))
        # The trial's value, early stopping and pruning all follow the study's objective.
        cfg["early_stopping"]["monitor"] = self.study_cfg.metric
        cfg["early_stopping"]["mode"] = "min" if self.study_cfg.direction == "minimize" else "max"
        cfg["wandb"]["group"] = self.study_cfg.name
        if trial_world_size(cfg["trainer"]) > 1 and str(cfg["trainer"].get("strategy") or "auto") == "auto":
            cfg["trainer"]["strategy"] = "ddp"  # what Lightning picks for several devices, made explicit for every rank
        return cfg

    def __call__(self, trial: optuna.Trial) -> float:
        from callbacks.pruning import OptunaPruning

        params = self.space.suggest(trial)
        applied = self.space.applied(params)
        if self.space.scaled:
            # trial.params hold what the sampler models (a normalised learning rate); the report,
            # the plots and a reader of the storage need the values the trial trained with.
            trial.set_user_attr("applied_params", applied)
            trial.set_user_attr("param_scales", self.space.scales())
        cfg = self.trial_config(params, trial.number)
        pruning = OptunaPruning(trial, monitor=self.study_cfg.metric, protected=budget_mod.is_baseline(trial),
                                full_examples=budget_mod.full_examples(cfg))
        run_name = f"trial-{trial.number:04d}"
        progress_start(trial, applied, self.study_cfg.n_trials, self.slots.get(trial.number), note=self.start_notes.pop(trial.number, ""))
        ranks = Ranks(cfg, Path(cfg["output_dir"]), run_name, self.study_cfg.metric)
        try:
            with ranks:
                result = train(
                    cfg, callbacks=[pruning], evaluator=self.evaluator, run_name=run_name,
                    keep_best_weights=self.study_cfg.save_best_model,
                    logger_params={"study": self._study_for_wandb(), "trial": trial.number, "params": applied,
                                   **({"sampled_params": params} if self.space.scaled else {})},
                )
        except UserError as err:
            self._record_failure(trial, err, "config")
            raise
        except (KeyboardInterrupt, SystemExit) as err:
            # Lightning turns Ctrl-C inside fit into sys.exit(1) after its own shutdown; as a
            # KeyboardInterrupt the trial is recorded as FAIL (retried by the next run), not
            # RUNNING forever, and tune() still writes the report of the trials so far.
            self._record_failure(trial, err, "interrupted")
            if isinstance(err, KeyboardInterrupt):
                raise
            raise KeyboardInterrupt from err
        except torch.cuda.OutOfMemoryError as err:
            self._record_failure(trial, err, "oom")
            raise TrialFailed(f"oom: {_one_line(err)}") from err
        except Exception as err:
            failed = ranks.failures
            self._record_failure(trial, err, "exception", note=f"other ranks: {', '.join(failed)}" if failed else "")
            raise TrialFailed(_one_line(err)) from err
        value = float(result["objective"])
        self._record(trial, result, pruning)
        pruning.check_pruned()
        if not math.isfinite(value):
            message = (f"no finite {self.study_cfg.metric}: {result['global_step']} steps ran and no "
                       f"evaluation logged it (trainer.val_check_interval vs trainer.max_steps?)")
            trial.set_user_attr("error", message)
            trial.set_user_attr("reason", "no_metric")
            raise TrialFailed(message)
        if self.study_cfg.save_best_model and result.get("best_state") is not None:
            self._keep_if_best(trial, value, result)
        return value

    def _study_for_wandb(self) -> dict[str, Any]:
        """The study section as W&B shows it: the storage URL without its password."""
        study = self.study_cfg.to_dict()
        study["storage"] = secrets.mask_url(self.study_cfg.storage_url)
        study["results_dir"] = str(self.study_cfg.results_path)  # null means results/optuna/<name>: say which
        return study

    def _record(self, trial: optuna.Trial, result: dict[str, Any], pruning: Any) -> None:
        attrs: dict[str, Any] = {
            "best_objective": result["objective"],
            "best_step": result["best_step"],
            "best_examples_seen": result["best_examples_seen"],
            "examples_seen": result["examples_seen"],
            "global_step": result["global_step"],
            "stopped_early": result["stopped_early"],
            "seconds": round(float(result["seconds"]), 2),
        }
        if "eval/accuracy" in result:
            attrs["accuracy"] = result["eval/accuracy"]
            attrs["accuracy_step"] = result.get("accuracy_step")
            attrs["categories"] = {c: int(result[f"eval/{c}"]) for c in report.CATEGORIES if f"eval/{c}" in result}
            attrs["accuracy_n"] = result.get("accuracy_n")
            if result.get("accuracy_ci"):
                attrs["accuracy_ci"] = result["accuracy_ci"]
        # Never a zero: an evaluation without a result is counted, and left out of every figure.
        for status, key in (("missing", "evaluations_missing"), ("error", "evaluations_failed")):
            count = sum(e.get("status") == status for e in result["evaluations"])
            if count:
                attrs[key] = count
        if pruning.pruned:
            attrs["pruned_at"] = pruning.pruned_at
        attrs["examples_budget"] = int(result["max_steps"]) * int(result["batch_size"])
        rungs = _rungs(trial.study.pruner, attrs["examples_budget"])
        if rungs:
            attrs["rungs"] = rungs
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        report.save_history(self.results_dir, self.study_cfg.name, trial.number, result["history"], result["evaluations"])

    def _record_failure(self, trial: optuna.Trial, err: BaseException, reason: str, note: str = "") -> None:
        path = report.trial_dir(self.results_dir, self.study_cfg.name, trial.number) / "error.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.mask("".join(traceback.format_exception(err)) + (f"\n{note}\n" if note else "")))
        trial.set_user_attr("error", _one_line(err) + (f" ({note})" if note else ""))
        trial.set_user_attr("reason", reason)
        trial.set_user_attr("traceback_file", str(path))

    def _keep_if_best(self, trial: optuna.Trial, value: float, result: dict[str, Any]) -> None:
        """Save this trial's best weights when no finished trial of the study beats it.

        Saved now, while the weights are in memory (the model object is reused by the next
        trial), and to disk, so the best model survives restarts and other workers see it.
        Workers sharing the results folder swap it under a lock, after checking again what the
        folder holds: two trials finishing together must leave the better one there.
        """
        study = trial.study
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if complete and not _better(value, study.best_value, self.study_cfg.direction):
            return
        final = self.results_dir / report.BEST_MODEL_DIR
        staging = self.results_dir / f".{report.BEST_MODEL_DIR}.trial-{trial.number:04d}"
        save_pretrained(result, staging)
        report.write_json(staging / report.BEST_MODEL_MARKER, {
            "study": study.study_name, "trial": trial.number, "value": value, "metric": self.study_cfg.metric,
            "params": dict(trial.params), "best_step": result["best_step"], "best_examples_seen": result["best_examples_seen"],
        })
        old = self.results_dir / f".{report.BEST_MODEL_DIR}.old-{trial.number:04d}"
        with storage_mod.FileLock(self.results_dir / f".{report.BEST_MODEL_DIR}.lock"):
            if not self._beats_saved(final, value, study.study_name):
                shutil.rmtree(staging, ignore_errors=True)
                return
            # Swap whole folders so a reader never sees a mix of two trials' files.
            if final.exists():
                final.rename(old)
            staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _beats_saved(self, final: Path, value: float, study_name: str) -> bool:
        try:
            saved = json.loads((final / report.BEST_MODEL_MARKER).read_text())
        except (OSError, ValueError):
            return True  # nothing (readable) there
        if saved.get("study") != study_name or saved.get("metric") != self.study_cfg.metric:
            return True  # another study's model: this study's best replaces it, as before locks
        return _better(value, float(saved["value"]), self.study_cfg.direction)


