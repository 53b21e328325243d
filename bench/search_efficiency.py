"""Sample efficiency of the search: TPE + ASHA (our defaults, or a variant) against random search without pruning.

On the embedded task (tiny Qwen2 model, generated arithmetic, CPU), for each of a few seeds, two
studies with the same number of trials and the same seeds:

- tpe_asha: the study as configs/tune.yaml runs it (its sampler, search space and ASHA pruner on
  examples seen), or a variant of it (below);
- random:   every point drawn at random from the plain search space (the learning rate searched
  as it is applied), no pruning.

Each study is one `python tune.py` (lit_sft.study.run.tune(cfg)) in a process of its own, with its
own temporary results folder and SQLite storage, W&B and plots off; the numbers are read back
from the storage afterwards. Both run the training defaults, early stopping included.

Budget: configs/tune.yaml gives every trial 20000 examples (any batch size), evaluates every
2000 and puts ASHA's first rung at 4000 (the 2nd evaluation). Too long for 72 trials (3 seeds x
2 methods x 12 trials, the config's count) on 2 CPU cores, so the bench scales all three down
together (default 5120 / 512 / 1024: the same rungs relative to a trial), keeping the rest of the
study as it is. `--max-steps` switches to a step budget instead.

How random search is obtained: the tuner's TPE sampler (reseeded with seed + trial number
before each trial) draws its first `n_startup_trials` points from its internal
optuna.samplers.RandomSampler. With `study.sampler.n_startup_trials = n_trials` every point of
the study is such a random draw, and `study.pruner.enabled = false` turns ASHA off. Random
search always searches the plain space (the config's space file with any `scale` removed), so
every variant is measured against the same random search. Side effects, wanted here: both
studies of one seed start from the same random points (paired; a variant whose start-up draws
differ, a normalised learning rate for one, breaks the pairing of the learning rate only), and
a random study's first k trials are the same whatever its n_trials, so a 20-trial random study
also serves as the 12-trial one (`--measure-at`, `--random-from`).

Variants of the tpe_asha study, one flag each, all against the same random studies
(`--random-from DIR` reads them from an earlier run instead of running them again):

    --lr-scale sqrt|linear|none   search the learning rate normalised by batch size
                                  (lit_sft/search_space.py `scale`), reference --lr-reference 32
    --sampler gp                  Optuna's GPSampler instead of TPE (study.sampler.kind)
    --gp-use-pruned               with gp: pruned trials count, valued at their last report
    --n-startup N                 study.sampler.n_startup_trials
    --n-ei-candidates N           TPE's candidates per proposal
    --univariate                  TPE models each parameter on its own (multivariate false)
    --floor-rounding              before issue 12 (bench only): evaluations every
                                  floor(eval_every_examples / batch) steps, the old behaviour, so
                                  large-batch trials reach the rungs late
    --tpe-asha-args '...'         any other tune.py overrides

Seeds: repetition i uses seed = first_seed + 1000 i for both `seed_everything` (data order) and
`study.seed` (the sampler). The sampler is reseeded with seed + trial number, so consecutive
seeds (0, 1) would share all but one of their points; 1000 apart they share none. The generated
data set itself (data.seed) is the config's, the same everywhere.

The measure, per seed: target = random search's best eval/loss (its best trial's value) x 1.01.
Walking each study's trials in trial order (one worker: the order they ran), add up the examples
each trial trained, up to the first evaluation whose eval/loss <= target: the compute the search
spent before it had a model as good as random search's best, within 1%. A trial's examples are
read from the storage: its intermediate values are reported at step = examples seen at every
evaluation; a trial that ran on counts up to its last report (or its user attr examples_seen if
larger), the trial that reached the target up to the report that did. Pruned trials count what
they trained before being pruned.

`--measure-at 12 20` measures the same studies at several trial counts: both methods' first k
trials (neither sampler nor pruner looks ahead at n_trials, so the first k trials of a longer
study are the k-trial study), against random's best of its first k.

Accuracy: each trial stores the evaluator's eval/accuracy at its best eval/loss step
(user attr `accuracy`); "best acc" is the highest of a study's trials, "acc@best" that of the
trial with the best eval/loss (the model the study hands over). Per count the bench prints the
mean of each over the seeds and the seeds where tpe_asha's acc@best is at least random's.

    python bench/search_efficiency.py [--seeds 3] [--n-trials 12] [--examples 5120] [--quick] [variant flags]

The last line is `examples_ratio: X`: the sum over seeds of TPE+ASHA's examples to the target
over the sum of random search's (ratio of sums; the geometric mean of per-seed ratios is printed
above it), at n_trials. Goal: <= 1/3. Where TPE+ASHA never reached the target in some seed, that
seed counts all it spent and the line reads `examples_ratio: >=X` (a lower bound).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "tune.py"
CONFIG = ROOT / "configs" / "tune.yaml"
METHODS = ("tpe_asha", "random")
SEED_STRIDE = 1000
"""Seeds of consecutive repetitions are this far apart: the sampler is reseeded with seed + trial
number, so it must exceed any study's trial count."""

FLOOR_ROUNDING = """\
# bench/search_efficiency.py --floor-rounding: the behaviour before issue 12, for the before/after
# measurement only. Evaluations every floor(eval_every_examples / batch) steps (now ceil), so a
# batch that does not divide eval_every_examples evaluates early and reaches each rung late.
import functools, math, runpy, sys
sys.path.insert(0, ROOT)
import lit_sft.config, lit_sft.study.objective, lit_sft.training

apply_budget_floor = functools.partial(lit_sft.config.apply_budget, round_eval=math.floor)
for module in (lit_sft.config, lit_sft.study.objective, lit_sft.training):
    module.apply_budget = apply_budget_floor
sys.argv[0] = TUNE  # tune.py reads its overrides from sys.argv[1:]
runpy.run_path(TUNE, run_name="__main__")
"""


# ---- pure helpers ----------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One trial as read back from the storage."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    params: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(examples seen, eval/loss) at each evaluation, in order (Optuna's intermediate values)."""
    value: float | None = None
    accuracy: float | None = None
    examples_attr: int | None = None
    """Examples the trial trained in all (user attr `examples_seen`), for a cross-check."""
    seconds: float | None = None
    """The trial's run time (start to finish in the storage)."""
    applied: dict[str, Any] | None = None
    """The values it trained with where they differ from params (a normalised learning rate)."""

    @property
    def examples(self) -> int:
        """Examples the trial trained: at its last evaluation, or its recorded total if larger
        (steps after the last evaluation: a budget that is no multiple of the evaluation period)."""
        last = self.curve[-1][0] if self.curve else 0
        return max(last, int(self.examples_attr or 0))

    @property
    def best_loss(self) -> float | None:
        finite = [v for _, v in self.curve if math.isfinite(v)]
        return min(finite) if finite else None


def curve_from_intermediate(values: dict[int, float]) -> list[tuple[int, float]]:
    """Optuna's {step: value} (step = examples seen) as a list sorted by examples."""
    return sorted((int(step), float(value)) for step, value in values.items())


def target_loss(best: float, tolerance: float = 0.01) -> float:
    """The loss that counts as within `tolerance` of `best` (a positive loss, minimized)."""
    return best * (1.0 + tolerance)


def examples_to_reach(trials: Sequence[TrialRecord], target: float) -> tuple[int | None, int | None, int]:
    """Cumulative examples over trials in number order until an evaluation first gets <= target.

    Returns (examples or None if never reached, number of the trial that reached it or None,
    total examples of all trials).
    """
    spent = 0
    reached: tuple[int, int] | None = None
    for trial in sorted(trials, key=lambda t: t.number):
        if reached is None:
            hit = next((ex for ex, loss in trial.curve if math.isfinite(loss) and loss <= target), None)
            if hit is not None:
                reached = (spent + hit, trial.number)
        spent += trial.examples
    if reached is None:
        return None, None, spent
    return reached[0], reached[1], spent


def best_value(trials: Sequence[TrialRecord]) -> float | None:
    """The study's best: its best complete trial's value, else the lowest eval/loss any trial logged."""
    values = [t.value for t in trials if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    if values:
        return min(values)
    losses = [t.best_loss for t in trials if t.best_loss is not None]
    return min(losses) if losses else None


def best_trial(trials: Sequence[TrialRecord]) -> TrialRecord | None:
    complete = [t for t in trials if t.state == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    return min(complete, key=lambda t: t.value) if complete else None


def ratio_of_sums(num: Iterable[float], den: Iterable[float]) -> float | None:
    num, den = list(num), list(den)
    return sum(num) / sum(den) if den and sum(den) > 0 else None


def geometric_mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def variant_space(space: dict[str, Any], lr_scale: str | None, reference: float) -> dict[str, Any]:
    """A search space (as parsed YAML) with the learning rate searched as `lr_scale` says: none =
    plain (any `scale` removed), sqrt / linear = normalised by the batch-size entry at
    `reference`; None = as it is."""
    if lr_scale is None:
        return space
    out = copy.deepcopy(space)
    by_key = {entry.get("key"): name for name, entry in out.items() if isinstance(entry, dict)}
    lr, batch = by_key.get("model.learning_rate"), by_key.get("data.batch_size")
    if lr is None or (lr_scale != "none" and batch is None):
        raise ValueError("the search space needs a model.learning_rate entry (and a data.batch_size one to scale by)")
    out[lr].pop("scale", None)
    if lr_scale != "none":
        out[lr]["scale"] = {"with": batch, "rule": lr_scale, "reference": reference}
    return out


def truncate(trials: Sequence[TrialRecord], k: int) -> list[TrialRecord]:
    """The study's first k trials: the k-trial study (sampler and pruner never look ahead)."""
    return [t for t in trials if t.number < k]


# ---- running the studies ---------------------------------------------------------------------


@dataclass
class StudyRun:
    method: str
    seed: int
    name: str
    results_dir: Path
    log: Path
    returncode: int | None = None
    wall_s: float | None = 0.0
    load: list[float] | None = None
    """1-minute load average at the study's start and end (the machine is shared)."""
    trials: list[TrialRecord] = field(default_factory=list)


def variant_overrides(args: argparse.Namespace) -> list[str]:
    """tune.py overrides of the tpe_asha variant the flags ask for (none: the config's defaults)."""
    out = []
    if args.sampler is not None:
        out += ["--study.sampler.kind", args.sampler]
    if args.n_startup is not None:
        out += ["--study.sampler.n_startup_trials", str(args.n_startup)]
    if args.n_ei_candidates is not None:
        out += ["--study.sampler.n_ei_candidates", str(args.n_ei_candidates)]
    if args.univariate:
        out += ["--study.sampler.multivariate", "false"]
    if args.gp_use_pruned:
        out += ["--study.sampler.gp_use_pruned", "true"]
    return out + shlex.split(args.tpe_asha_args or "")


def describe_variant(args: argparse.Namespace) -> str:
    parts = []
    if args.lr_scale is not None:
        parts.append(f"lr {'plain' if args.lr_scale == 'none' else args.lr_scale + '-normalised (reference batch ' + format(args.lr_reference, 'g') + ')'}")
    if args.floor_rounding:
        parts.append("floor rounding (before issue 12)")
    extra = variant_overrides(args)
    if extra:
        parts.append(" ".join(extra))
    return ", ".join(parts) or "the config's defaults"


def study_overrides(method: str, seed: int, args: argparse.Namespace, results_dir: Path, name: str) -> list[str]:
    """tune.py arguments of one study: configs/tune.yaml with the bench's budget and seeds."""
    out = [
        "--config", str(CONFIG),
        "--seed_everything", str(seed),
        "--study.seed", str(seed),
        "--study.name", name,
        "--study.results_dir", str(results_dir),
        "--study.n_trials", str(args.n_trials),
        "--study.plots", "false",
        "--study.save_best_model", "false",  # a copy of the best weights costs time and says nothing here
        "--wandb.enabled", "false",
        "--trainer.enable_progress_bar", "false",
        "--evaluator.enabled", "true" if args.evaluator else "false",
    ]
    if args.max_steps is not None:
        # A step budget: the example budget off, ASHA's first rung derived by the tuner
        # (val_check_interval x the largest batch size).
        out += ["--budget.examples", "null", "--budget.eval_every_examples", "null",
                "--trainer.max_steps", str(args.max_steps), "--trainer.val_check_interval", str(args.val_check_interval),
                "--study.pruner.min_resource", "null"]
    else:
        out += ["--budget.examples", str(args.examples), "--budget.eval_every_examples", str(args.eval_every_examples),
                "--study.pruner.min_resource", str(args.min_resource)]
    if args.num_problems is not None:
        out += ["--data.num_validation_problems", str(args.num_problems)]
    space = getattr(args, f"{method}_space", None)
    if space is not None:
        out += ["--study.search_space", str(space)]
    if method == "random":
        out += ["--study.sampler.kind", "tpe", "--study.sampler.n_startup_trials", str(args.n_trials), "--study.pruner.enabled", "false"]
    elif method == "tpe_asha":
        out += variant_overrides(args)
    else:
        raise ValueError(method)
    return out


def study_command(method: str, args: argparse.Namespace) -> list[str]:
    """How a study's process starts: tune.py, or (--floor-rounding, tpe_asha only) tune.py under
    the old rounding."""
    if method == "tpe_asha" and args.floor_rounding:
        header = f"ROOT, TUNE = {str(ROOT)!r}, {str(TUNE)!r}\n"
        return [sys.executable, "-c", header + FLOOR_ROUNDING]
    return [sys.executable, str(TUNE)]


def run_study(run: StudyRun, command: list[str], overrides: list[str]) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    with open(run.log, "w") as log:
        shown = [c if len(c) < 200 else "<floor-rounding script>" for c in command]
        log.write(" ".join([*shown, *overrides]) + "\n")
        log.flush()
        proc = subprocess.run([*command, *overrides], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    run.wall_s = time.perf_counter() - start
    run.load = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    run.returncode = proc.returncode


def read_trials(results_dir: Path, name: str) -> list[TrialRecord]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = results_dir / "optuna.db"
    if not db.exists():
        return []
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db.resolve()}")
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        out.append(TrialRecord(
            number=t.number, state=t.state.name, params=dict(t.params),
            curve=curve_from_intermediate(t.intermediate_values),
            value=t.value if t.value is not None else None,
            accuracy=attrs.get("accuracy"), examples_attr=attrs.get("examples_seen"), seconds=seconds,
            applied=attrs.get("applied_params") if isinstance(attrs.get("applied_params"), dict) else None,
        ))
    return sorted(out, key=lambda r: r.number)


# ---- the report ------------------------------------------------------------------------------


def _params(t: TrialRecord) -> str:
    parts = []
    for k, v in t.params.items():
        short = {"learning_rate": "lr", "batch_size": "bs", "weight_decay": "wd"}.get(k, k)
        text = f"{short}={v:.3g}" if isinstance(v, float) else f"{short}={v}"
        if t.applied and k in t.applied and t.applied[k] != v:
            text += f" (applied {t.applied[k]:.3g})"
        parts.append(text)
    return " ".join(parts)


def trial_table(trials: Sequence[TrialRecord], target: float | None) -> str:
    rows = []
    cumulative = 0
    for t in trials:
        cumulative += t.examples
        hit = target is not None and any(math.isfinite(v) and v <= target for _, v in t.curve)
        rows.append([t.number, t.state.lower(), _params(t), t.examples, cumulative, t.best_loss, t.accuracy, "yes" if hit else ""])
    return format_table(["trial", "state", "params", "examples", "cumulative", "best eval/loss", "acc", "<=target"], rows)


def summarize_seed(trials: dict[str, Sequence[TrialRecord]], tolerance: float) -> dict[str, Any]:
    """Per method: examples to random's best (within tolerance), spent, best loss and accuracies."""
    random_best = best_value(trials["random"])
    target = target_loss(random_best, tolerance) if random_best is not None else None
    out: dict[str, Any] = {"random_best": random_best, "target": target, "methods": {}}
    for method, records in trials.items():
        reach, trial, total = examples_to_reach(records, target) if target is not None else (None, None, sum(t.examples for t in records))
        best = best_trial(records)
        accs = [t.accuracy for t in records if t.accuracy is not None]
        states = [t.state for t in records]
        seconds = [t.seconds for t in records]
        out["methods"][method] = {
            "trials": len(records), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "examples_total": total, "examples_to_target": reach, "reached_in_trial": trial,
            "best_loss": best_value(records), "best_accuracy": max(accs) if accs else None,
            "accuracy_of_best": best.accuracy if best else None,
            "trial_seconds": round(sum(seconds), 1) if seconds and None not in seconds else None,
        }
    return out


def seed_table(summary: dict[str, Any]) -> str:
    rows = []
    for method, m in summary["methods"].items():
        rows.append([
            method, f"{m['complete']}/{m['pruned']}/{m['failed']}", m["examples_total"],
            m["examples_to_target"] if m["examples_to_target"] is not None else f">{m['examples_total']} (not reached)",
            m["reached_in_trial"], m["best_loss"], m["best_accuracy"], m["accuracy_of_best"], m["trial_seconds"],
        ])
    return format_table(
        ["method", "compl/pruned/fail", "examples spent", "examples to target", "in trial", "best eval/loss", "best acc", "acc@best", "trial s"], rows,
    )


def to_target(m: dict[str, Any]) -> tuple[float, bool]:
    """Examples to the target, and whether that is a lower bound (never reached: all it spent)."""
    if m["examples_to_target"] is None:
        return float(m["examples_total"]), True
    return float(m["examples_to_target"]), False


def overall(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The figures over seeds: examples ratio (ratio of sums), geometric mean, seeds that reached
    the target, accuracies (mean best, mean of the handed-over model, seeds not worse than random)."""
    tpe, rnd, ratios = [], [], []
    for s in summaries.values():
        t_ex, _ = to_target(s["methods"]["tpe_asha"])
        r_ex, _ = to_target(s["methods"]["random"])
        tpe.append(t_ex)
        rnd.append(r_ex)
        ratios.append(t_ex / r_ex if r_ex > 0 else None)
    methods = {m: [s["methods"][m] for s in summaries.values()] for m in METHODS}

    def mean(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    pairs = [(t["accuracy_of_best"], r["accuracy_of_best"]) for t, r in zip(methods["tpe_asha"], methods["random"])]
    return {
        "examples_ratio": ratio_of_sums(tpe, rnd),
        "examples_ratio_is_lower_bound": any(m["examples_to_target"] is None for m in methods["tpe_asha"]),
        "geometric_mean_ratio": geometric_mean(ratios),
        "per_seed_ratio": ratios,
        "spent_ratio": ratio_of_sums((m["examples_total"] for m in methods["tpe_asha"]), (m["examples_total"] for m in methods["random"])),
        "reached": {m: sum(x["examples_to_target"] is not None for x in methods[m]) for m in METHODS},
        "n_seeds": len(summaries),
        "mean_best_accuracy": {m: mean([x["best_accuracy"] for x in methods[m]]) for m in METHODS},
        "mean_accuracy_of_best": {m: mean([x["accuracy_of_best"] for x in methods[m]]) for m in METHODS},
        "accuracy_of_best_not_worse": sum(t is not None and r is not None and t >= r for t, r in pairs),
        "accuracy_compared": sum(t is not None and r is not None for t, r in pairs),
        "trial_seconds": {m: sum(x["trial_seconds"] or 0 for x in methods[m]) for m in METHODS},
    }


def overall_table(summaries: dict[int, dict[str, Any]]) -> str:
    rows = []
    for seed, s in summaries.items():
        mt, mr = s["methods"]["tpe_asha"], s["methods"]["random"]
        t_ex, t_lb = to_target(mt)
        r_ex, r_lb = to_target(mr)
        ratio = t_ex / r_ex if r_ex > 0 else None
        rows.append([
            seed, f"{'>' if t_lb else ''}{int(t_ex)}" + (f" (#{mt['reached_in_trial']})" if not t_lb else ""),
            f"{'>' if r_lb else ''}{int(r_ex)}" + (f" (#{mr['reached_in_trial']})" if not r_lb else ""),
            f"{'>' if t_lb else ''}{ratio:.3f}" if ratio is not None else None,
            mt["examples_total"], mr["examples_total"], mt["best_loss"], mr["best_loss"], mt["best_accuracy"], mr["best_accuracy"],
            mt["accuracy_of_best"], mr["accuracy_of_best"],
        ])
    return format_table(
        ["seed", "tpe_asha to target", "random to target", "ratio", "tpe_asha spent", "random spent",
         "tpe_asha best loss", "random best loss", "tpe_asha best acc", "random best acc", "tpe_asha acc@best", "random acc@best"], rows,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="repetitions (default 3; --quick: 1)")
    parser.add_argument("--first-seed", type=int, default=0, help=f"seed of the first repetition; then +{SEED_STRIDE} each")
    parser.add_argument("--n-trials", type=int, default=None, help="trials per study, the same for both methods (default 12, as configs/tune.yaml; --quick: 3)")
    parser.add_argument("--measure-at", type=int, nargs="+", default=None, metavar="K",
                        help="also measure at these trial counts (each <= --n-trials): both methods' first K trials")
    parser.add_argument("--examples", type=int, default=None,
                        help="budget.examples: examples per trial, any batch size (default 5120, a quarter of configs/tune.yaml's "
                             "20000; --quick: 640)")
    parser.add_argument("--eval-every-examples", type=int, default=None, help="budget.eval_every_examples (default: examples / 10, as the config)")
    parser.add_argument("--min-resource", type=int, default=None,
                        help="study.pruner.min_resource, ASHA's first rung (default: 2 x eval-every-examples, as the config's 4000)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="a step budget instead of the example budget: trainer.max_steps per trial (batch 64 then trains 8x "
                             "the examples of batch 8); ASHA's first rung becomes the tuner's default")
    parser.add_argument("--val-check-interval", type=int, default=None, help="with --max-steps: trainer.val_check_interval (default max_steps / 10)")
    parser.add_argument("--num-problems", type=int, default=None, help="data.num_validation_problems (default: the config's 200; --quick: 20)")
    parser.add_argument("--no-evaluator", dest="evaluator", action="store_false", help="no accuracy (faster)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="within this fraction of random search's best loss")
    parser.add_argument("--quick", action="store_true", help="a tiny budget: a smoke check of the whole pipeline")
    parser.add_argument("--workdir", default=None,
                        help="where the studies' folders go (default: a new temporary folder); studies already there with "
                             "--n-trials trials are read, with fewer are extended to --n-trials")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the studies already in --workdir (same seeds and --n-trials)")
    parser.add_argument("--random-from", default=None, metavar="DIR",
                        help="read the random-search studies from an earlier run's --workdir instead of running them "
                             "(same seeds and budget, at least --n-trials trials: random search does not depend on the variant)")
    parser.add_argument("--keep", action="store_true", help="keep the studies' folders (always kept when a study failed)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    variant = parser.add_argument_group("variants of the tpe_asha study (random search stays as it is)")
    variant.add_argument("--lr-scale", choices=["none", "sqrt", "linear"], default=None,
                         help="search the learning rate normalised by batch size (none: plain); default: as the config's space file")
    variant.add_argument("--lr-reference", type=float, default=32.0, help="with --lr-scale: the batch size at which sampled = applied")
    variant.add_argument("--sampler", choices=["tpe", "gp"], default=None, help="study.sampler.kind (default: the config's)")
    variant.add_argument("--n-startup", type=int, default=None, help="study.sampler.n_startup_trials (default: the config's)")
    variant.add_argument("--n-ei-candidates", type=int, default=None, help="study.sampler.n_ei_candidates (TPE)")
    variant.add_argument("--univariate", action="store_true", help="study.sampler.multivariate false (TPE)")
    variant.add_argument("--gp-use-pruned", action="store_true",
                         help="study.sampler.gp_use_pruned true (with --sampler gp): pruned trials count, at their last report")
    variant.add_argument("--floor-rounding", action="store_true",
                         help="before issue 12 (bench only): evaluate every floor(eval_every_examples / batch) steps, the old behaviour")
    variant.add_argument("--tpe-asha-args", default="",
                         help="extra tune.py overrides for the tpe_asha studies only, e.g. "
                              "'--study.pruner.min_early_stopping_rate 1' (a variant of ASHA against the same random search)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    args.n_trials = args.n_trials if args.n_trials is not None else (3 if quick else 12)
    args.measure_at = sorted(set(args.measure_at or []) | {args.n_trials})
    args.examples = args.examples if args.examples is not None else (640 if quick else 5120)
    args.eval_every_examples = args.eval_every_examples or max(1, args.examples // 10)
    args.min_resource = args.min_resource or 2 * args.eval_every_examples
    if args.max_steps is not None and args.val_check_interval is None:
        args.val_check_interval = max(1, args.max_steps // 10)
    if args.num_problems is None and quick:
        args.num_problems = 20
    if args.report_only and not args.workdir:
        parser.error("--report-only needs --workdir")
    if args.n_trials >= SEED_STRIDE:
        parser.error(f"--n-trials must be < {SEED_STRIDE} (seeds of repetitions are {SEED_STRIDE} apart)")
    if args.measure_at[0] < 1 or args.measure_at[-1] > args.n_trials:
        parser.error(f"--measure-at: each count must be in [1, --n-trials {args.n_trials}]")
    if args.max_steps is not None and args.max_steps % args.val_check_interval:
        parser.error("--max-steps must be a multiple of --val-check-interval, so a trial's last evaluation is where it stops")
    args.random_space = args.tpe_asha_space = None  # set by prepare_spaces
    return args


def describe_budget(args: argparse.Namespace) -> str:
    if args.max_steps is not None:
        return f"max_steps {args.max_steps}, val_check_interval {args.val_check_interval}, ASHA min_resource: the tuner's default"
    return (f"{args.examples} examples per trial, eval every {args.eval_every_examples}, "
            f"ASHA min_resource {args.min_resource} x reduction factor 3")


def prepare_spaces(args: argparse.Namespace, work: Path) -> None:
    """The search space files of both methods: random search's plain, the variant's as asked."""
    config = yaml.safe_load(CONFIG.read_text())
    source = ROOT / config["study"]["search_space"]
    space = yaml.safe_load(source.read_text())
    for method, scale in (("random", "none"), ("tpe_asha", args.lr_scale)):
        text = yaml.safe_dump(variant_space(space, scale, args.lr_reference), sort_keys=False)
        path = work / f"space-{method}.yaml"
        path.write_text(f"# {source.name}, learning rate: {scale or 'as the file says'} (bench/search_efficiency.py)\n" + text)
        setattr(args, f"{method}_space", path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [args.first_seed + SEED_STRIDE * i for i in range(args.seeds)]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="search_efficiency."))
    work.mkdir(parents=True, exist_ok=True)
    prepare_spaces(args, work)
    print(f"search efficiency: {len(seeds)} seeds {seeds}, {args.n_trials} trials per study (measured at "
          f"{', '.join(map(str, args.measure_at))}), {describe_budget(args)}, evaluator {'on' if args.evaluator else 'off'}, "
          f"target = random's best x {1 + args.tolerance:g}; tpe_asha: {describe_variant(args)}; studies in {work}; "
          f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)", flush=True)
    start = time.perf_counter()
    runs: dict[int, dict[str, StudyRun]] = {}
    failed = False
    for seed in seeds:
        runs[seed] = {}
        for method in ("random", "tpe_asha"):
            name = f"se-{method}-s{seed}"
            folder = Path(args.random_from) if method == "random" and args.random_from else work
            results_dir = folder / name
            run = StudyRun(method, seed, name, results_dir, folder / f"{name}.log")
            wall_file = folder / f"{name}.wall_s"
            if args.report_only or folder != work:
                if wall_file.exists():
                    words = wall_file.read_text().split()
                    run.wall_s = float(words[0])
                    run.load = [float(w) for w in words[1:3]] or None
                else:
                    run.wall_s = None
            else:
                # A study already there with fewer trials is extended (tune.py resumes it: the
                # first k trials of a longer study are the k-trial study); one with enough is read.
                earlier = read_trials(results_dir, name)
                done = len(earlier) >= args.n_trials and wall_file.exists()
                before = [float(w) for w in wall_file.read_text().split()] if wall_file.exists() and earlier else [0.0]
                if done:
                    run.wall_s, run.load = before[0], before[1:3] or None
                else:
                    results_dir.mkdir(parents=True, exist_ok=True)
                    run_study(run, study_command(method, args), study_overrides(method, seed, args, results_dir, name))
                    run.wall_s += before[0]
                    run.load = [before[1], run.load[1]] if len(before) > 2 else run.load
                    wall_file.write_text(f"{run.wall_s:.1f} {run.load[0]} {run.load[1]}\n")
            run.trials = read_trials(results_dir, name)
            states = [t.state.lower() for t in run.trials]
            load = f", load {run.load[0]:.2f} -> {run.load[1]:.2f}" if run.load else ""
            print(f"  seed {seed} {method}: exit {_cell(run.returncode)}, {len(run.trials)} trials "
                  f"({', '.join(f'{s} {states.count(s)}' for s in sorted(set(states)))}) in {_cell(run.wall_s)} s{load} [log {run.log}]", flush=True)
            if run.returncode not in (0, None) or len(run.trials) < args.n_trials:
                failed = True
                print("    study failed or short; last lines of its log:\n" + _tail(run.log, 15), flush=True)
            past = [t.number for t in run.trials if t.curve and t.examples > t.curve[-1][0]]
            if past:
                print(f"    note: trials {past} trained past their last evaluation (counted)", flush=True)
            runs[seed][method] = run
        trials = {m: truncate(r.trials, args.n_trials) for m, r in runs[seed].items()}
        summary = summarize_seed(trials, args.tolerance)
        print(f"\n== seed {seed}: random's best eval/loss {_cell(summary['random_best'])}, target <= {_cell(summary['target'])}")
        for method in METHODS:
            print(f"-- {method} trials")
            print(trial_table(trials[method], summary["target"]))
        print(f"-- seed {seed} summary")
        print(seed_table(summary) + "\n", flush=True)

    results: dict[int, dict[str, Any]] = {}
    for k in args.measure_at:
        summaries = {seed: summarize_seed({m: truncate(r.trials, k) for m, r in by_method.items()}, args.tolerance)
                     for seed, by_method in runs.items()}
        figures = overall(summaries)
        results[k] = {**figures, "per_seed": summaries}
        bound = ">=" if figures["examples_ratio_is_lower_bound"] else ""
        print(f"== at {k} trials (examples to target = examples trained until an eval/loss <= random's best of its first {k} "
              f"x {1 + args.tolerance:g}; '>' = never reached: all it spent, a lower bound)")
        print(overall_table(summaries))
        acc, acc_best = figures["mean_best_accuracy"], figures["mean_accuracy_of_best"]
        print(f"examples ratio {bound}{_cell(figures['examples_ratio'])} (geometric mean of seeds {bound}{_cell(figures['geometric_mean_ratio'])}); "
              f"target reached in {figures['reached']['tpe_asha']}/{figures['n_seeds']} seeds (random {figures['reached']['random']}); "
              f"examples spent tpe_asha / random {_cell(figures['spent_ratio'])}")
        print(f"mean best accuracy tpe_asha {_cell(acc['tpe_asha'])} vs random {_cell(acc['random'])}; the handed-over model "
              f"(best eval/loss) {_cell(acc_best['tpe_asha'])} vs {_cell(acc_best['random'])}, not worse than random's in "
              f"{figures['accuracy_of_best_not_worse']}/{figures['accuracy_compared']} seeds; trial time tpe_asha "
              f"{figures['trial_seconds']['tpe_asha']:.0f} s, random {figures['trial_seconds']['random']:.0f} s\n", flush=True)

    wall = time.perf_counter() - start
    walls = {m: [runs[s][m].wall_s for s in runs] for m in METHODS}
    loads = [v for by_method in runs.values() for r in by_method.values() if r.load for v in r.load]
    for method in METHODS:
        known = [w for w in walls[method] if w is not None]
        print(f"wall time of the {method} studies: {sum(known):.0f} s ({sum(known) / 60:.1f} min)"
              + (f", {len(walls[method]) - len(known)} unknown" if len(known) < len(walls[method]) else ""))
    if loads:
        print(f"load average (1 min) at the studies' starts and ends: {min(loads):.2f} to {max(loads):.2f}, on {os.cpu_count()} CPUs")
    print(f"wall time of this run: {wall:.0f} s ({wall / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "variant": describe_variant(args), "at": results,
            "walls": {m: walls[m] for m in METHODS}, "loads": {s: {m: r.load for m, r in by_method.items()} for s, by_method in runs.items()},
            "wall_s": wall,
        }, indent=2, default=str))
    if args.keep or failed:
        print(f"studies kept in {work}")
    elif not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print("goal: examples_ratio <= 0.333 (TPE+ASHA over random, ratio of sums over seeds)")
    for k in args.measure_at:
        ratio, lower = results[k]["examples_ratio"], results[k]["examples_ratio_is_lower_bound"]
        label = "examples_ratio" if k == args.n_trials else f"examples_ratio@{k}"
        print(f"{label}: {'>=' if lower else ''}{ratio:.3f}" if ratio is not None else f"{label}: nan")
    return 1 if failed else 0


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in lines[-n:])


if __name__ == "__main__":
    sys.exit(main())
