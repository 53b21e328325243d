"""Studies replayed on recorded learning curves (bench/curves.py replay): search methods compared
at an equal total budget over many paired seeds, in minutes, training nothing.

Each method is a real Optuna study (in-memory storage) driven by ask/tell: Optuna's samplers
(the tuner's own TPE built by lit_sft.study.build.make_sampler from configs/tune.yaml, Optuna's
RandomSampler, GPSampler), the tuner's pruner (lit_sft.pruner, built by make_pruner) or
Optuna's, and the tuner's early-stopping rule (Lightning's EarlyStopping: an improvement is a
drop of more than min_delta; stop after `patience` evaluations without one). A proposed point
trains nothing: it takes the recorded curve of the nearest configuration in the normalised space
(log learning rate and weight decay scaled to [0, 1], batch size by its index among the
choices), as tabular benchmarks do, and is "trained" evaluation by evaluation: each evaluation
is reported at its examples seen, the pruner asked, early stopping checked.

The study runs trials one after another while the examples spent are below the budget B (the
running trial finishes), as `tune.py` with `budget.total_examples` does. What a study hands
over at spend s is its best complete trial so far: best_at(s) is the lowest eval/loss any
complete trial had reached by the time s examples were spent in all.

Figures per method, over the seeds: best_at(B/4, B/2, B) (median and IQR) with the accuracy of
that checkpoint; examples to reach the target (the median over seeds of random search's
best_at(B); a seed that never reaches it counts as infinite); the win rate against random search
at equal budget (lower best_at(B) wins, a tie counts half).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPACE_FILE = ROOT / "configs" / "search_space_tiny.yaml"
TUNE_CONFIG = ROOT / "configs" / "tune.yaml"
FULL_TRIALS = 12
"""The budget B is this many full trials' examples."""
SEED_STRIDE = 1000
"""Seeds of a method's studies are this far apart: the tuner's sampler is reseeded with seed +
trial number, so consecutive seeds would share all but one of their points."""


# ---- the table as curves ------------------------------------------------------------------------


@dataclass
class Curve:
    params: dict[str, Any]
    examples: list[int]
    loss: list[float]
    acc: list[float | None]


class Table:
    """The recorded configurations, with nearest-neighbour lookup in the normalised space."""

    def __init__(self, raw: dict[str, Any], eval_every: int | None = None) -> None:
        import numpy as np

        self.meta = raw["meta"]
        self.full = int(self.meta["examples"])
        self.space = self.meta["space"]
        self.curves = [self._curve(row, eval_every) for row in raw["configs"]]
        if not self.curves:
            raise ValueError("the table has no configurations: run `python bench/curves.py record` first")
        self.points = np.array([self.normalise(c.params) for c in self.curves])

    def _curve(self, row: dict[str, Any], eval_every: int | None) -> Curve:
        keep = [k for k, x in enumerate(row["examples"]) if eval_every is None or x % eval_every == 0 or x == row["examples"][-1]]
        loss = [math.inf if row["loss"][k] is None else float(row["loss"][k]) for k in keep]
        return Curve(row["params"], [row["examples"][k] for k in keep], loss, [row["acc"][k] for k in keep])

    def normalise(self, params: dict[str, Any]) -> list[float]:
        out = []
        for name, spec in sorted(self.space.items()):
            value = params[name]
            if spec["kind"] == "categorical":
                choices = spec["choices"]
                out.append(choices.index(value) / max(1, len(choices) - 1))
            elif spec["log"]:
                out.append((math.log(value) - math.log(spec["low"])) / (math.log(spec["high"]) - math.log(spec["low"])))
            else:
                out.append((value - spec["low"]) / (spec["high"] - spec["low"]))
        return out

    def nearest(self, params: dict[str, Any]) -> Curve:
        import numpy as np

        distance = ((self.points - np.array(self.normalise(params))) ** 2).sum(axis=1)
        return self.curves[int(distance.argmin())]


# ---- one study ---------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    sampler: str  # tuner | random | optuna_tpe | gp
    pruner: str  # none | asha | median | hyperband
    baseline: bool = False
    study_overrides: dict[str, Any] = field(default_factory=dict)
    """study.sampler.* / study.pruner.* values over configs/tune.yaml's (for the tuner's sampler and ASHA)."""
    max_seeds: int | None = None
    """GPSampler costs seconds per study: its rows may use fewer seeds."""


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("random", "random", "none"),
    Method("random_asha", "random", "asha"),
    Method("tpe", "tuner", "none"),
    Method("tpe_asha", "tuner", "asha"),
    Method("tpe_asha_baseline", "tuner", "asha", baseline=True),
    Method("optuna_defaults", "optuna_tpe", "median"),
    Method("tpe_hyperband", "tuner", "hyperband"),
    Method("random_hyperband", "random", "hyperband"),
    Method("tpe_asha_before", "tuner", "asha", study_overrides={"sampler": {"n_startup_trials": 3}, "pruner": {"reduction_factor": 3}}),
    Method("tpe_asha_baseline_startup3", "tuner", "asha", baseline=True, study_overrides={"sampler": {"n_startup_trials": 3}}),
    Method("tpe_asha_baseline_rf3", "tuner", "asha", baseline=True, study_overrides={"pruner": {"reduction_factor": 3}}),
    Method("tpe_asha_baseline_startup15", "tuner", "asha", baseline=True, study_overrides={"sampler": {"n_startup_trials": 15}}),
    Method("tpe_asha_tol0", "tuner", "asha", study_overrides={"pruner": {"tolerance": 0.0}}),
    Method("random_asha_rf2", "random", "asha", study_overrides={"pruner": {"reduction_factor": 2}}),
    Method("tpe_asha_startup1", "tuner", "asha", baseline=True, study_overrides={"sampler": {"n_startup_trials": 1}}),
    Method("tpe_asha_startup10", "tuner", "asha", study_overrides={"sampler": {"n_startup_trials": 10}}),
    Method("gp_asha_pruned", "gp", "asha", study_overrides={"sampler": {"kind": "gp", "gp_use_pruned": True}}, max_seeds=20),
]}
DEFAULT_METHODS = ["random", "random_asha", "tpe", "tpe_asha", "tpe_asha_baseline", "optuna_defaults", "tpe_hyperband",
                   "random_hyperband", "tpe_asha_before", "tpe_asha_baseline_startup3", "tpe_asha_baseline_rf3",
                   "tpe_asha_baseline_startup15", "tpe_asha_startup1", "tpe_asha_tol0", "random_asha_rf2", "gp_asha_pruned"]
"""What `replay` compares by default. `tpe_asha_baseline` is configs/tune.yaml's study as it is (its sampler,
its pruner, its baseline trial); `tpe_asha` and `tpe` are it without the baseline and without ASHA; the
rest change one thing each (the first rung stays at R/9 for every ASHA variant)."""


def _study_config(method: Method, seed: int, min_resource: int):
    import yaml

    from lit_sft.study.config import StudyConfig

    raw = yaml.safe_load(TUNE_CONFIG.read_text())["study"]
    raw = {**raw, "seed": seed}
    for section, values in method.study_overrides.items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["pruner"] = {**raw.get("pruner", {}), "min_resource": min_resource, "enabled": True}
    return StudyConfig.from_dict(raw)


def make_study(method: Method, seed: int, table: Table):
    import optuna

    from lit_sft.study.build import make_pruner, make_sampler

    rf = 3
    min_resource = math.ceil(table.full / rf**2)
    study_cfg = _study_config(method, seed, min_resource)
    samplers = {
        "tuner": lambda: make_sampler(study_cfg),
        "gp": lambda: make_sampler(study_cfg),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "optuna_tpe": lambda: optuna.samplers.TPESampler(seed=seed),
    }
    pruners = {
        "none": lambda: optuna.pruners.NopPruner(),
        "asha": lambda: make_pruner(study_cfg, {}, None),
        "median": lambda: optuna.pruners.MedianPruner(),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=table.full, reduction_factor=rf),
    }
    return optuna.create_study(direction="minimize", sampler=samplers[method.sampler](), pruner=pruners[method.pruner]())


@dataclass
class StudyTrace:
    """One replayed study: the handed-over model's eval/loss (and accuracy) as examples are spent."""

    events: list[tuple[int, float, float | None]]
    """(examples spent in all when it happened, eval/loss, accuracy) of each evaluation of a
    trial that completed, in order of spend."""
    spent: int
    trials: int
    pruned: int

    def best_at(self, examples: float) -> tuple[float, float | None]:
        best, acc = math.inf, None
        for at, loss, accuracy in self.events:
            if at > examples:
                break
            if loss < best:
                best, acc = loss, accuracy
        return best, acc

    def examples_to(self, target: float) -> float:
        return next((at for at, loss, _ in self.events if loss <= target), math.inf)


def run_study(method: Method, seed: int, table: Table, budget: int, patience: int, min_delta: float, baseline: dict[str, Any]) -> StudyTrace:
    import optuna

    from lit_sft.search_space import load_search_space

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = load_search_space(SPACE_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = make_study(method, seed, table)
        if method.baseline:
            study.enqueue_trial(baseline)
        spent, events, trials, pruned = 0, [], 0, 0
        while spent < budget:
            trial = study.ask()
            params = space.suggest(trial)
            curve = table.nearest(params)
            protected = method.baseline and trials == 0
            used, state, points = _train(trial, curve, table.full, patience, min_delta, protected)
            if state == "pruned":
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned += 1
            else:
                study.tell(trial, min(loss for _, loss, _ in points))
                events.extend((spent + x, loss, acc) for x, loss, acc in points)
            spent += used
            trials += 1
    events.sort(key=lambda e: e[0])
    return StudyTrace(events, spent, trials, pruned)


def _train(trial: Any, curve: Curve, full: int, patience: int, min_delta: float, protected: bool) -> tuple[int, str, list[tuple[int, float, float | None]]]:
    """Walk the curve as a trial trains: report each evaluation, ask the pruner, check early
    stopping. Returns (examples trained, complete | pruned, the evaluations made)."""
    best, wait, points = math.inf, 0, []
    for x, loss, acc in zip(curve.examples, curve.loss, curve.acc):
        points.append((x, loss, acc))
        trial.report(loss, x)
        prune = trial.should_prune()
        if prune and not protected and x < full:
            return x, "pruned", points
        if loss < best - min_delta:
            best, wait = loss, 0
        else:
            wait += 1
            if wait >= patience:
                return x, "complete", points
    return curve.examples[-1], "complete", points


# ---- many seeds --------------------------------------------------------------------------------


_TABLE: Table | None = None


def _init(raw: dict[str, Any], eval_every: int | None) -> None:
    global _TABLE
    _TABLE = Table(raw, eval_every)


def _one(job: tuple[str, int, int, int, float, dict[str, Any]]) -> tuple[str, int, StudyTrace, float]:
    name, seed, budget, patience, min_delta, baseline = job
    start = time.perf_counter()
    trace = run_study(METHODS[name], seed, _TABLE, budget, patience, min_delta, baseline)
    return name, seed, trace, time.perf_counter() - start


def replay_all(raw: dict[str, Any], methods: list[str], seeds: int, *, eval_every: int | None, budget: int,
               patience: int, min_delta: float, baseline: dict[str, Any], workers: int) -> dict[str, dict[int, StudyTrace]]:
    jobs = [(name, 10_000 + SEED_STRIDE * s, budget, patience, min_delta, baseline)
            for name in methods for s in range(min(seeds, METHODS[name].max_seeds or seeds))]
    out: dict[str, dict[int, StudyTrace]] = {name: {} for name in methods}
    seconds: dict[str, float] = {name: 0.0 for name in methods}
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_init, initargs=(raw, eval_every)) as pool:
            results = list(pool.map(_one, jobs, chunksize=4))
    else:
        _init(raw, eval_every)
        results = [_one(job) for job in jobs]
    for name, seed, trace, secs in results:
        out[name][seed] = trace
        seconds[name] += secs
    for name in methods:
        out[name]["__seconds__"] = seconds[name]  # type: ignore[assignment]
    return out


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    finite = sorted(values)
    if len(finite) < 2:
        v = finite[0] if finite else math.nan
        return v, v, v
    q = statistics.quantiles(finite, n=4, method="inclusive")
    return q[1], q[0], q[2]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def summarise(traces: dict[str, dict[int, StudyTrace]], budget: int, reference: str = "random") -> tuple[list[dict[str, Any]], float]:
    ref = {s: t for s, t in traces[reference].items() if s != "__seconds__"}
    target = _median([t.best_at(budget)[0] for t in ref.values()])
    ref_to_target = statistics.median_low([t.examples_to(target) for t in ref.values()])
    rows = []
    for name, by_seed in traces.items():
        seconds = by_seed.get("__seconds__", 0.0)
        studies = {s: t for s, t in by_seed.items() if s != "__seconds__"}
        row: dict[str, Any] = {"method": name, "seeds": len(studies), "seconds_per_study": seconds / max(1, len(studies))}
        for share in (0.25, 0.5, 1.0):
            losses = [t.best_at(share * budget)[0] for t in studies.values()]
            accs = [a for t in studies.values() if (a := t.best_at(share * budget)[1]) is not None]
            row[f"loss@{share:g}B"] = _quartiles(losses)
            row[f"acc@{share:g}B"] = _quartiles(accs) if accs else (math.nan,) * 3
        to_target = [t.examples_to(target) for t in studies.values()]
        row["to_target"] = statistics.median_low(to_target)
        row["reached"] = sum(math.isfinite(x) for x in to_target) / len(to_target)
        row["ratio"] = row["to_target"] / ref_to_target if ref_to_target and math.isfinite(ref_to_target) else math.nan
        wins = []
        for seed, trace in studies.items():
            if seed not in ref:
                continue
            mine, theirs = trace.best_at(budget)[0], ref[seed].best_at(budget)[0]
            wins.append(1.0 if mine < theirs else 0.5 if mine == theirs else 0.0)
        row["win_rate"] = sum(wins) / len(wins) if wins else math.nan
        row["trials"] = statistics.mean(t.trials for t in studies.values())
        row["pruned"] = statistics.mean(t.pruned for t in studies.values())
        rows.append(row)
    return rows, target


def format_rows(rows: list[dict[str, Any]], budget: int) -> str:
    def q(t: tuple[float, float, float], digits: int = 4) -> str:
        med, lo, hi = t
        return "-" if math.isnan(med) else f"{med:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"

    header = ["method", "seeds", "trials", "pruned", "loss@B/4", "loss@B/2", "loss@B", "acc@B", "to target", "reached", "ratio", "win rate", "s/study"]
    lines = []
    for r in rows:
        to = "inf" if not math.isfinite(r["to_target"]) else f"{r['to_target']:,.0f}"
        lines.append([r["method"], str(r["seeds"]), f"{r['trials']:.1f}", f"{r['pruned']:.1f}", q(r["loss@0.25B"]), q(r["loss@0.5B"]),
                      q(r["loss@1B"]), q(r["acc@1B"], 3), to, f"{r['reached']:.2f}", f"{r['ratio']:.3f}", f"{r['win_rate']:.2f}",
                      f"{r['seconds_per_study']:.2f}"])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def baseline_params() -> dict[str, Any]:
    """configs/tune.yaml's own values at the search space's keys (what the tuner enqueues)."""
    from lit_sft.config import parse
    from lit_sft.search_space import load_search_space
    from lit_sft.study.budget import baseline_params as base

    cfg = parse(["--config", str(TUNE_CONFIG)], tune=True)
    return base(load_search_space(SPACE_FILE, cfg), cfg)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=100, help="paired seeds per method")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    parser.add_argument("--method", default="tpe_asha_baseline", help="the method configs/tune.yaml uses (the last lines are its)")
    parser.add_argument("--budget-trials", type=float, default=FULL_TRIALS, help="the budget B in full trials")
    parser.add_argument("--eval-every", type=int, default=512, help="evaluate every this many examples (a multiple of the table's)")
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--min-delta", type=float, default=0.001)
    parser.add_argument("--workers", type=int, default=2)


def main(args: argparse.Namespace) -> None:
    import json

    raw = json.loads(Path(args.table).read_text())
    table = Table(raw, args.eval_every)
    budget = int(args.budget_trials * table.full)
    methods = list(dict.fromkeys([*args.methods, "random", args.method]))
    start = time.perf_counter()
    print(f"table: {len(table.curves)} configurations, {table.full:,} examples each, evaluated every {args.eval_every}; "
          f"budget B = {args.budget_trials:g} full trials = {budget:,} examples; early stopping patience {args.patience}, "
          f"min_delta {args.min_delta}", flush=True)
    traces = replay_all(raw, methods, args.seeds, eval_every=args.eval_every, budget=budget, patience=args.patience,
                        min_delta=args.min_delta, baseline=baseline_params(), workers=args.workers)
    rows, target = summarise(traces, budget)
    print(f"target: eval/loss {target:.4g} (median over seeds of random search's best at B)")
    print(format_rows(rows, budget))
    print(f"replayed in {time.perf_counter() - start:.0f} s")
    mine = next(r for r in rows if r["method"] == args.method)
    print(f"method: {args.method}")
    print(f"seeds: {mine['seeds']}")
    print(f"win_rate: {mine['win_rate']:.3f}")
    print(f"examples_to_target_ratio: {mine['ratio']:.3f}")
