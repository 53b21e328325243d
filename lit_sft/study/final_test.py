"""The final test: the study's best model graded once on problems no trial and no selection saw.

Every trial is selected on the validation problems (its best evaluation, the pruner's rungs,
the best trial), so the best trial's validation accuracy is biased upwards: it won a contest on
those very problems. The test split answers how good the chosen model is. It is graded after
the study, by an evaluator of its own that loads the saved best model, and stored on the study
(`study.user_attrs["final_test"]`), so a resumed study knows which trial it graded and grades
again only when the best trial has changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lit_sft.stats import accuracy_interval
from lit_sft.study import report
from lit_sft.study.config import StudyConfig

ATTR = "final_test"
SKIPPED = "final_test_skipped"
"""Study attr: why the best trial has no final test (no test set, no evaluator), for the report."""
NO_TEST_SET = "no test set is configured: set data.test_path (problems no trial and no selection step sees)"
READY_TIMEOUT_S = 900.0
GRADE_TIMEOUT_S = 3600.0
"""Bounds for loading the best model and grading the test set (a 1.5B model on 500 problems
takes minutes on a GPU with vLLM, longer with transformers)."""


def needs_grading(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best trial if its test result is not stored yet (None: no best, or already graded)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    best = study.best_trial
    prior = study.user_attrs.get(ATTR) or {}
    return None if prior.get("trial") == best.number and "error" not in prior else best


def run_final_test(study: optuna.Study, cfg: dict[str, Any], study_cfg: StudyConfig) -> dict[str, Any] | None:
    """Grade the best model on the test problems, store and return the result (None: nothing to do)."""
    best = needs_grading(study)
    if best is None:
        return None
    if not cfg["evaluator"]["enabled"]:
        return _skip(study, "evaluator.enabled is false: no evaluator grades a test set")
    from lit_sft.data import SFTDataModule

    problems = SFTDataModule(**cfg["data"]).test_problems
    if not problems:
        return _skip(study, NO_TEST_SET)  # real data without data.test_path
    source = cfg["data"].get("test_path") or "generated test split"
    model_dir = study_cfg.results_path / report.BEST_MODEL_DIR
    problem = _best_model_problem(model_dir, study.study_name, best.number, study_cfg)
    outcome = {"trial": best.number, "error": problem} if problem else _grade(cfg, model_dir, problems, best)
    outcome["source"] = str(source)
    study.set_user_attr(ATTR, outcome)
    print(_line(outcome, best), flush=True)
    return outcome


def _skip(study: optuna.Study, reason: str) -> None:
    """No final test: stored for the report, whose console lines and REPORT.md say why (never silent)."""
    study.set_user_attr(SKIPPED, reason)
    return None


def _best_model_problem(model_dir: Path, study_name: str, number: int, study_cfg: StudyConfig) -> str | None:
    if not study_cfg.save_best_model:
        return "study.save_best_model is false: no best model to test"
    try:
        saved = json.loads((model_dir / report.BEST_MODEL_MARKER).read_text())
    except (OSError, ValueError):
        return f"no best model in {model_dir}"
    if saved.get("study") != study_name or saved.get("trial") != number:
        return f"{model_dir} holds trial {saved.get('trial')} of study {saved.get('study')!r}, not trial {number}"
    return None


def _grade(cfg: dict[str, Any], model_dir: Path, problems: list, best: optuna.trial.FrozenTrial) -> dict[str, Any]:
    from lit_sft.errors import UserError
    from lit_sft.evaluator.launch import start_evaluator

    print(f"final test: grading trial {best.number}'s best model on {len(problems)} test problems", flush=True)
    try:
        client = start_evaluator(cfg, problems=problems, model_path=str(model_dir))
    except UserError as err:  # a shared server gone or refusing by now: the study's results stay
        return {"trial": best.number, "error": str(err)}
    try:
        if not client.wait_ready(READY_TIMEOUT_S):
            return {"trial": best.number, "error": f"the evaluator did not load {model_dir} within {READY_TIMEOUT_S:g} s"}
        job = client.post("final-test", int(best.user_attrs.get("best_step") or 0),
                          int(best.user_attrs.get("best_examples_seen") or 0), str(_weights_file(model_dir)))
        results = client.wait(GRADE_TIMEOUT_S, jobs=[job])
    finally:
        client.stop()
    if not results or results[0]["status"] != "ok":
        why = results[0]["error"] if results else f"no result within {GRADE_TIMEOUT_S:g} s"
        return {"trial": best.number, "error": why}
    r = results[0]
    interval = accuracy_interval(r["correct"], r["num_problems"])
    return {
        "trial": best.number,
        "accuracy": r["accuracy"],
        "accuracy_ci": [round(interval[0], 4), round(interval[1], 4)] if interval else None,
        "n": r["num_problems"],
        "format_accuracy": r["format_accuracy"],
        "categories": {c: int(r[c]) for c in report.CATEGORIES},
    }


def _weights_file(model_dir: Path) -> Path:
    """The best model's weights as one safetensors file the evaluator can swap in.

    The evaluator already loaded these weights from the folder; posting them again is what
    makes it generate and grade. A sharded save (big models) is written once as a single file.
    """
    single = model_dir / "model.safetensors"
    if single.is_file():
        return single
    from transformers import AutoModelForCausalLM

    from lit_sft.weights import save_weights

    merged = model_dir / "lit_sft_weights.safetensors"
    if not merged.is_file():
        save_weights(AutoModelForCausalLM.from_pretrained(model_dir), merged)
    return merged


def _line(outcome: dict[str, Any], best: optuna.trial.FrozenTrial) -> str:
    if "error" in outcome:
        return f"final test: trial {outcome['trial']} not graded: {outcome['error']}"
    lo, hi = outcome["accuracy_ci"] or (float("nan"), float("nan"))
    validation = best.user_attrs.get("accuracy")
    seen = f" (validation {validation:.3f})" if validation is not None else ""
    return (f"final test: trial {outcome['trial']} accuracy {outcome['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"on {outcome['n']} test problems{seen}")
