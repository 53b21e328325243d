"""Sample efficiency of the search: TPE + ASHA (our defaults) against random search without pruning.

On the embedded task (tiny Qwen2 model, generated arithmetic, CPU), for each of a few seeds, two
studies with the same number of trials and the same seeds:

- tpe_asha: the study as configs/tune.yaml runs it (TPE with its 5 random start-up trials,
  ASHA = SuccessiveHalvingPruner on examples seen, reduction factor 3);
- random:   every point drawn by optuna.samplers.RandomSampler, no pruning.

Each study is one `python tune.py` (lit_sft.study.run.tune(cfg)) in a process of its own, with its
own temporary results folder and SQLite storage, W&B and plots off; the numbers are read back
from the storage afterwards. Both run the training defaults, early stopping included.

Budget: configs/tune.yaml gives every trial 20000 examples (any batch size), evaluates every
2000 and puts ASHA's first rung at 4000 (the 2nd evaluation). Too long for 72 trials (3 seeds x
2 methods x 12 trials, the config's count) on 2 CPU cores, so the bench scales all three down
together (default 5120 / 512 / 1024: the same rungs relative to a trial), keeping the rest of the
study as it is. `--max-steps` switches to a step
budget instead.

How random search is obtained: the tuner always builds its (trial-seeded) TPESampler, and a TPE
sampler draws its first `n_startup_trials` points from its internal
optuna.samplers.RandomSampler. With `study.sampler.n_startup_trials = n_trials` every point of
the study is such a random draw (reseeded with seed + trial number, as TPE is), and
`study.pruner.enabled = false` turns ASHA off. A side effect, wanted here: both studies of one
seed start from the same five random points, so the comparison is paired.

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

Accuracy: each trial stores the evaluator's eval/accuracy at its best eval/loss step
(user attr `accuracy`); "best acc" is the highest of a study's trials, "acc@best" that of the
trial with the best eval/loss (the one the study would hand over).

    python bench/search_efficiency.py [--seeds 3] [--n-trials 12] [--examples 5120] [--quick]

The last line is `examples_ratio: X`: the sum over seeds of TPE+ASHA's examples to the target
over the sum of random search's (ratio of sums; the geometric mean of per-seed ratios is printed
above it). Goal: <= 1/3. Where TPE+ASHA never reached the target in some seed, that seed counts
all it spent and the line reads `examples_ratio: >=X` (a lower bound).
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "tune.py"
CONFIG = ROOT / "configs" / "tune.yaml"
METHODS = ("tpe_asha", "random")
SEED_STRIDE = 1000
"""Seeds of consecutive repetitions are this far apart: the sampler is reseeded with seed + trial
number, so it must exceed any study's trial count."""


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
    trials: list[TrialRecord] = field(default_factory=list)


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
    if method == "random":
        out += ["--study.sampler.n_startup_trials", str(args.n_trials), "--study.pruner.enabled", "false"]
    elif method == "tpe_asha":
        out += shlex.split(args.tpe_asha_args or "")
    else:
        raise ValueError(method)
    return out


def run_study(run: StudyRun, overrides: list[str]) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(run.log, "w") as log:
        log.write(" ".join([sys.executable, str(TUNE), *overrides]) + "\n")
        log.flush()
        proc = subprocess.run([sys.executable, str(TUNE), *overrides], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    run.wall_s = time.perf_counter() - start
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
        out.append(TrialRecord(
            number=t.number, state=t.state.name, params=dict(t.params),
            curve=curve_from_intermediate(t.intermediate_values),
            value=t.value if t.value is not None else None,
            accuracy=attrs.get("accuracy"), examples_attr=attrs.get("examples_seen"),
        ))
    return sorted(out, key=lambda r: r.number)


# ---- the report ------------------------------------------------------------------------------


def _params(p: dict[str, Any]) -> str:
    parts = []
    for k, v in p.items():
        short = {"learning_rate": "lr", "batch_size": "bs", "weight_decay": "wd"}.get(k, k)
        parts.append(f"{short}={v:.3g}" if isinstance(v, float) else f"{short}={v}")
    return " ".join(parts)


def trial_table(run: StudyRun, target: float | None) -> str:
    rows = []
    cumulative = 0
    for t in run.trials:
        cumulative += t.examples
        hit = target is not None and any(math.isfinite(v) and v <= target for _, v in t.curve)
        rows.append([t.number, t.state.lower(), _params(t.params), t.examples, cumulative, t.best_loss, t.accuracy, "yes" if hit else ""])
    return format_table(["trial", "state", "params", "examples", "cumulative", "best eval/loss", "acc", "<=target"], rows)


def summarize_seed(runs: dict[str, StudyRun], tolerance: float) -> dict[str, Any]:
    random_best = best_value(runs["random"].trials)
    target = target_loss(random_best, tolerance) if random_best is not None else None
    out: dict[str, Any] = {"random_best": random_best, "target": target, "methods": {}}
    for method, run in runs.items():
        reach, trial, total = examples_to_reach(run.trials, target) if target is not None else (None, None, sum(t.examples for t in run.trials))
        best = best_trial(run.trials)
        accs = [t.accuracy for t in run.trials if t.accuracy is not None]
        states = [t.state for t in run.trials]
        out["methods"][method] = {
            "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "examples_total": total, "examples_to_target": reach, "reached_in_trial": trial,
            "best_loss": best_value(run.trials), "best_accuracy": max(accs) if accs else None,
            "accuracy_of_best": best.accuracy if best else None,
            "wall_s": round(run.wall_s, 1) if run.wall_s is not None else None, "returncode": run.returncode,
        }
    return out


def seed_table(summary: dict[str, Any]) -> str:
    rows = []
    for method, m in summary["methods"].items():
        rows.append([
            method, f"{m['complete']}/{m['pruned']}/{m['failed']}", m["examples_total"],
            m["examples_to_target"] if m["examples_to_target"] is not None else f">{m['examples_total']} (not reached)",
            m["reached_in_trial"], m["best_loss"], m["best_accuracy"], m["accuracy_of_best"], m["wall_s"],
        ])
    return format_table(
        ["method", "compl/pruned/fail", "examples spent", "examples to target", "in trial", "best eval/loss", "best acc", "acc@best", "wall s"], rows,
    )


def to_target(m: dict[str, Any]) -> tuple[float, bool]:
    """Examples to the target, and whether that is a lower bound (never reached: all it spent)."""
    if m["examples_to_target"] is None:
        return float(m["examples_total"]), True
    return float(m["examples_to_target"]), False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=None, help="repetitions (default 3; --quick: 1)")
    parser.add_argument("--first-seed", type=int, default=0, help=f"seed of the first repetition; then +{SEED_STRIDE} each")
    parser.add_argument("--n-trials", type=int, default=None, help="trials per study, the same for both methods (default 12, as configs/tune.yaml; --quick: 3)")
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
    parser.add_argument("--workdir", default=None, help="where the studies' folders go (default: a new temporary folder)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the studies already in --workdir (same seeds and --n-trials)")
    parser.add_argument("--random-from", default=None, metavar="DIR",
                        help="read the random-search studies from an earlier run's --workdir instead of running them "
                             "(same seeds, --n-trials and budget: random search does not depend on --tpe-asha-args)")
    parser.add_argument("--keep", action="store_true", help="keep the studies' folders (always kept when a study failed)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--tpe-asha-args", default="",
                        help="extra tune.py overrides for the tpe_asha studies only, e.g. "
                             "'--study.pruner.min_early_stopping_rate 1' (a variant of ASHA against the same random search)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    args.n_trials = args.n_trials if args.n_trials is not None else (3 if quick else 12)
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
    if args.max_steps is not None and args.max_steps % args.val_check_interval:
        parser.error("--max-steps must be a multiple of --val-check-interval, so a trial's last evaluation is where it stops")
    return args


def describe_budget(args: argparse.Namespace) -> str:
    if args.max_steps is not None:
        return f"max_steps {args.max_steps}, val_check_interval {args.val_check_interval}, ASHA min_resource: the tuner's default"
    return (f"{args.examples} examples per trial, eval every {args.eval_every_examples}, "
            f"ASHA min_resource {args.min_resource} x reduction factor 3")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [args.first_seed + SEED_STRIDE * i for i in range(args.seeds)]
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="search_efficiency."))
    work.mkdir(parents=True, exist_ok=True)
    print(f"search efficiency: {len(seeds)} seeds {seeds}, {args.n_trials} trials per study, {describe_budget(args)}, "
          f"evaluator {'on' if args.evaluator else 'off'}, "
          f"target = random's best x {1 + args.tolerance:g}; studies in {work}", flush=True)
    start = time.perf_counter()
    summaries: dict[int, dict[str, Any]] = {}
    failed = False
    for seed in seeds:
        runs: dict[str, StudyRun] = {}
        for method in ("random", "tpe_asha"):
            name = f"se-{method}-s{seed}"
            folder = Path(args.random_from) if method == "random" and args.random_from else work
            results_dir = folder / name
            results_dir.mkdir(parents=True, exist_ok=True)
            run = StudyRun(method, seed, name, results_dir, folder / f"{name}.log")
            wall_file = folder / f"{name}.wall_s"
            if args.report_only or folder != work:
                run.wall_s = float(wall_file.read_text()) if wall_file.exists() else None
            else:
                run_study(run, study_overrides(method, seed, args, results_dir, name))
                wall_file.write_text(f"{run.wall_s:.1f}\n")
            run.trials = read_trials(results_dir, name)
            states = [t.state.lower() for t in run.trials]
            print(f"  seed {seed} {method}: exit {_cell(run.returncode)}, {len(run.trials)} trials "
                  f"({', '.join(f'{s} {states.count(s)}' for s in sorted(set(states)))}) in {_cell(run.wall_s)} s [log {run.log}]", flush=True)
            if run.returncode not in (0, None) or len(run.trials) < args.n_trials:
                failed = True
                print("    study failed or short; last lines of its log:\n" + _tail(run.log, 15), flush=True)
            past = [t.number for t in run.trials if t.curve and t.examples > t.curve[-1][0]]
            if past:
                print(f"    note: trials {past} trained past their last evaluation (counted)", flush=True)
            runs[method] = run
        summary = summarize_seed(runs, args.tolerance)
        summaries[seed] = summary
        print(f"\n== seed {seed}: random's best eval/loss {_cell(summary['random_best'])}, target <= {_cell(summary['target'])}")
        for method in METHODS:
            print(f"-- {method} trials")
            print(trial_table(runs[method], summary["target"]))
        print(f"-- seed {seed} summary")
        print(seed_table(summary) + "\n", flush=True)

    # overall
    rows = []
    tpe, rnd, ratios = [], [], []
    censored = False
    for seed, s in summaries.items():
        t_ex, t_lb = to_target(s["methods"]["tpe_asha"])
        r_ex, r_lb = to_target(s["methods"]["random"])
        censored |= t_lb or r_lb
        tpe.append(t_ex)
        rnd.append(r_ex)
        ratio = t_ex / r_ex if r_ex > 0 else None
        ratios.append(ratio)
        mt, mr = s["methods"]["tpe_asha"], s["methods"]["random"]
        rows.append([
            seed, f"{'>' if t_lb else ''}{int(t_ex)}", f"{'>' if r_lb else ''}{int(r_ex)}",
            f"{'>' if t_lb else ''}{ratio:.3f}" if ratio is not None else None,
            mt["examples_total"], mr["examples_total"], mt["best_loss"], mr["best_loss"], mt["best_accuracy"], mr["best_accuracy"],
            mt["accuracy_of_best"], mr["accuracy_of_best"],
        ])
    sum_ratio = ratio_of_sums(tpe, rnd)
    geo = geometric_mean(ratios)
    tpe_censored = any(s["methods"]["tpe_asha"]["examples_to_target"] is None for s in summaries.values())
    bound = ">" if tpe_censored else ""
    rows.append([
        "all", f"{bound}{int(sum(tpe))}", int(sum(rnd)), f"{bound}{sum_ratio:.3f}" if sum_ratio is not None else None,
        sum(s["methods"]["tpe_asha"]["examples_total"] for s in summaries.values()),
        sum(s["methods"]["random"]["examples_total"] for s in summaries.values()),
        _min(s["methods"]["tpe_asha"]["best_loss"] for s in summaries.values()),
        _min(s["methods"]["random"]["best_loss"] for s in summaries.values()),
        _max(s["methods"]["tpe_asha"]["best_accuracy"] for s in summaries.values()),
        _max(s["methods"]["random"]["best_accuracy"] for s in summaries.values()), None, None,
    ])
    wall = time.perf_counter() - start
    if args.report_only:
        walls = [m["wall_s"] for s in summaries.values() for m in s["methods"].values()]
        wall = sum(walls) if all(w is not None for w in walls) else math.nan
    print("== overall (examples to target = examples trained until an eval/loss <= random's best x "
          f"{1 + args.tolerance:g}; '>' = never reached: all it spent, a lower bound)")
    print(format_table(
        ["seed", "tpe_asha to target", "random to target", "ratio", "tpe_asha spent", "random spent",
         "tpe_asha best loss", "random best loss", "tpe_asha best acc", "random best acc", "tpe_asha acc@best", "random acc@best"], rows,
    ))
    spent_ratio = ratio_of_sums((s["methods"]["tpe_asha"]["examples_total"] for s in summaries.values()),
                                (s["methods"]["random"]["examples_total"] for s in summaries.values()))
    print(f"total examples spent, tpe_asha / random: {_cell(spent_ratio)}")
    print(f"geometric mean of per-seed ratios: {'>=' if tpe_censored else ''}{_cell(geo)}")
    reached = {m: sum(s["methods"][m]["examples_to_target"] is not None for s in summaries.values()) for m in METHODS}
    print(f"seeds where the target was reached: tpe_asha {reached['tpe_asha']}/{len(summaries)}, random {reached['random']}/{len(summaries)}")
    if censored:
        print("a study that never reached the target counts all it spent: a lower bound on its examples to target; where it "
              "is tpe_asha's, the ratio below is a lower bound too (written >=X): within its n_trials TPE+ASHA never "
              "matched random search's best there")
    what = "wall time of the studies (report only: their recorded walls)" if args.report_only else "wall time"
    print(f"{what}: {wall:.0f} s ({wall / 60:.1f} min)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seeds": summaries, "examples_ratio": sum_ratio,
                                               "examples_ratio_is_lower_bound": tpe_censored,
                                               "geometric_mean_ratio": geo, "wall_s": wall}, indent=2, default=str))
    if args.keep or failed:
        print(f"studies kept in {work}")
    elif not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print("goal: examples_ratio <= 0.333 (TPE+ASHA over random, ratio of sums over seeds)")
    print(f"examples_ratio: {bound}{'=' if bound else ''}{sum_ratio:.3f}" if sum_ratio is not None else "examples_ratio: nan")
    return 1 if failed else 0


def _min(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return min(values) if values else None


def _max(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _tail(path: Path, n: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in lines[-n:])


if __name__ == "__main__":
    sys.exit(main())
