"""Recorded learning curves of the embedded task, and studies replayed on them.

    python bench/curves.py record [--configs 240]     # hours; stop it any time, rerun to continue
    python bench/curves.py replay [--seeds 100]       # minutes; trains nothing
    python bench/curves.py check [--seeds 3]          # real studies of the same task, against the replay

`record` trains configurations drawn at random from the embedded search space
(configs/search_space_tiny.yaml), each to its full budget with no pruning and no early stopping,
through the product's own `train(cfg)` (configs/tune.yaml's sections, one evaluator process for
all, as the tuner runs them), and records eval/loss and the evaluator's accuracy at every
evaluation. Configuration i is drawn from its own seed, so the table is the same whoever records
it, and a stopped recording continues at the first index the table lacks; the table is rewritten
(atomically) after every configuration, so a kill loses at most the one in progress.

The task is the shrunk one of bench/search_efficiency.py, scaled for rungs at R/9, R/3 and R:
R = 4,608 examples per configuration (9 x 512), evaluated every 512 examples (every batch size of
the space, 8..64, divides 512, so each evaluation, and each rung, falls exactly on its example
count), 200 validation problems graded at each. The full embedded budget (20,000 examples, about
a minute a configuration on a quiet machine) would take over 3 hours for 200; this one takes
about 20 s.

`replay` (bench/replay.py does the work) runs Optuna's real samplers, the tuner's real
pruner and its early-stopping rule against the table: a proposed point trains nothing and takes
the curve of its nearest recorded configuration in the normalised space (log learning rate and
weight decay scaled to [0, 1], batch size by its index among the choices), as tabular benchmarks
(LCBench, HPOBench) do. Every method gets the same total budget B in examples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so `python bench/curves.py` imports lit_sft from the repo root

TABLE = ROOT / "bench" / "curves_embedded.json"
CONFIG = ROOT / "configs" / "tune.yaml"
EXAMPLES = 4608
EVAL_EVERY = 512
SEED_BASE = 7_000_000
"""Configuration i is drawn with random.Random(SEED_BASE + i)."""


# ---- the table --------------------------------------------------------------------------------


def load_table(path: Path = TABLE) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {"meta": {}, "configs": []}


def write_table(table: dict[str, Any], path: Path = TABLE) -> None:
    """One line per configuration (a diff shows what a recording session added), written atomically."""
    lines = ["{", f' "meta": {json.dumps(table["meta"], sort_keys=True)},', ' "configs": [']
    rows = [json.dumps(row, separators=(",", ":")) for row in table["configs"]]
    lines += [f"  {row}," for row in rows[:-1]] + ([f"  {rows[-1]}"] if rows else [])
    lines += [" ]", "}"]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def draw(space: Any, index: int) -> dict[str, Any]:
    """Configuration `index`: every entry uniform in its range (log ranges in log space)."""
    rng = random.Random(SEED_BASE + index)
    values: dict[str, Any] = {}
    for param in space.params:
        name = param.name
        if param.kind == "categorical":
            values[name] = rng.choice(list(param.choices))
        elif param.log:
            values[name] = math.exp(rng.uniform(math.log(param.low), math.log(param.high)))
        elif param.kind == "int":
            values[name] = rng.randint(int(param.low), int(param.high))
        else:
            values[name] = rng.uniform(param.low, param.high)
    return values


def _sig(value: float | None, digits: int = 5) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def curve_row(index: int, params: dict[str, Any], result: dict[str, Any], batch: int) -> dict[str, Any]:
    """One configuration's curve: examples seen at each evaluation, its eval/loss and accuracy."""
    losses = {int(r["examples_seen"]): float(r["eval/loss"]) for r in result["history"] if "eval/loss" in r}
    graded = {int(e["step"]) * batch: e.get("accuracy") for e in result["evaluations"] if e.get("status") == "ok"}
    examples = sorted(losses)
    return {
        "i": index,
        "params": {k: (_sig(v, 6) if isinstance(v, float) else v) for k, v in params.items()},
        "examples": examples,
        "loss": [_sig(losses[x]) for x in examples],
        "acc": [None if graded.get(x) is None else round(float(graded[x]), 4) for x in examples],
        "seconds": round(float(result["seconds"]), 1),
    }


# ---- record -----------------------------------------------------------------------------------


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record_config(examples: int, eval_every: int, out_dir: Path) -> dict[str, Any]:
    """configs/tune.yaml's run sections with the recording's budget: full length, nothing stops it."""
    from lit_sft.config import parse

    cfg = parse(["--config", str(CONFIG),
                 "--budget.examples", str(examples), "--budget.eval_every_examples", str(eval_every),
                 "--early_stopping.enabled", "false", "--wandb.enabled", "false",
                 "--trainer.enable_progress_bar", "false", "--output_dir", str(out_dir)], tune=True)
    cfg.pop("study")
    return cfg


def record(args: argparse.Namespace) -> None:
    from lit_sft.config import apply_budget
    from lit_sft.evaluator.launch import start_evaluator
    from lit_sft.search_space import load_search_space
    from lit_sft.training import train

    path = Path(args.table)
    table = load_table(path)
    meta = table["meta"]
    if meta and (meta.get("examples"), meta.get("eval_every_examples")) != (args.examples, args.eval_every):
        raise SystemExit(f"error: {path} was recorded at {meta.get('examples')} examples / {meta.get('eval_every_examples')}; "
                         f"pass those or another --table")
    out_dir = Path(tempfile.mkdtemp(prefix="curves-"))
    cfg = record_config(args.examples, args.eval_every, out_dir)
    space_path = ROOT / "configs" / "search_space_tiny.yaml"
    space = load_search_space(space_path, cfg)
    table["meta"] = {
        **meta,
        "examples": args.examples, "eval_every_examples": args.eval_every,
        "config": "configs/tune.yaml (early stopping off, no pruner, W&B off)",
        "search_space": "configs/search_space_tiny.yaml",
        "space": {name: {"kind": p.kind, "low": p.low, "high": p.high, "log": p.log, "choices": list(p.choices) if p.choices else None}
                  for p in space.params for name in [p.name]},
        "num_validation_problems": cfg["data"]["num_validation_problems"],
        "draw": f"configuration i: random.Random({SEED_BASE} + i), uniform (log-uniform for log ranges)",
        "commits": sorted(set(meta.get("commits", [])) | {_commit()}),
        "machines": sorted(set(meta.get("machines", [])) | {f"{platform.machine()}, {os.cpu_count()} cores, torch {_torch()}"}),
    }
    done = {row["i"] for row in table["configs"]}
    todo = [i for i in range(args.configs) if i not in done]
    print(f"{path.name}: {len(done)} configurations recorded, {len(todo)} to go", flush=True)
    evaluator = start_evaluator(cfg)
    try:
        for i in todo:
            params = draw(space, i)
            run = apply_budget(space.apply(cfg, params))
            start = time.perf_counter()
            result = train(run, evaluator=evaluator, run_name=f"curve-{i:04d}")
            row = curve_row(i, params, result, int(run["data"]["batch_size"]))
            table["configs"] = sorted([*table["configs"], row], key=lambda r: r["i"])
            write_table(table, path)
            best = min((v for v in row["loss"] if v is not None), default=float("nan"))
            acc = max((a for a in row["acc"] if a is not None), default=float("nan"))
            print(f"[{len(table['configs'])}/{args.configs}] config {i}: lr {params['learning_rate']:.3g} batch {params['batch_size']} "
                  f"wd {params['weight_decay']:.3f}: best eval/loss {best:.4g}, best accuracy {acc:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        if evaluator is not None:
            evaluator.stop()


def _torch() -> str:
    import torch

    return torch.__version__


# ---- check: real studies against the replay --------------------------------------------------------

REAL_METHODS = {
    "random": ["--study.sampler.n_startup_trials", "100000", "--study.pruner.enabled", "false", "--study.baseline_trial", "false"],
    "random_asha": ["--study.sampler.n_startup_trials", "100000", "--study.baseline_trial", "false"],
    "tpe": ["--study.pruner.enabled", "false", "--study.baseline_trial", "false"],
    "tpe_asha": ["--study.baseline_trial", "false"],
    "tpe_asha_baseline": [],
}
"""The replay's methods that tune.py itself can run (configs/tune.yaml plus these overrides)."""


def real_trace(storage_url: str, name: str) -> Any:
    """A finished real study as the replay sees one: its complete trials' evaluations, in the
    order the examples were spent (one worker: trial order)."""
    import optuna
    from optuna.trial import TrialState

    from bench.replay import StudyTrace
    from lit_sft.study.budget import trial_examples

    trials = sorted(optuna.load_study(study_name=name, storage=storage_url).trials, key=lambda t: t.number)
    events, spent = [], 0
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            events.extend((spent + int(x), float(v), None) for x, v in sorted(trial.intermediate_values.items()))
        spent += trial_examples(trial)
    events.sort(key=lambda e: e[0])
    return StudyTrace(events, spent, len(trials), sum(t.state == TrialState.PRUNED for t in trials))


def check(args: argparse.Namespace) -> None:
    """Real tune.py studies of the shrunk task at the replay's budget, 3 seeds per method, then the
    same figures as the replay, and the replay's ranking beside them. Studies are kept under
    --out and resumed by a rerun (a finished one is only read)."""
    from bench.replay import SEED_STRIDE, baseline_params, format_rows, replay_all, summarise

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table_raw = load_table(Path(args.table))
    full = int(table_raw["meta"]["examples"])
    budget = int(args.budget_trials * full)
    traces: dict[str, dict[int, Any]] = {m: {} for m in args.methods}
    for method in args.methods:
        for k in range(args.seeds):
            seed = 10_000 + SEED_STRIDE * k
            name = f"{method}-{seed}"
            argv = [sys.executable, str(ROOT / "tune.py"), "--config", str(CONFIG),
                    "--budget.examples", str(full), "--budget.eval_every_examples", str(args.eval_every),
                    "--budget.total_examples", str(budget), "--study.n_trials", "null", "--study.seed", str(seed),
                    "--study.name", name, "--study.results_dir", str(out / name), "--study.plots", "false",
                    "--study.save_best_model", "false", "--wandb.enabled", "false", "--trainer.enable_progress_bar", "false",
                    *REAL_METHODS[method]]
            start = time.perf_counter()
            with open(out / f"{name}.log", "a") as log:
                code = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "offline"}).returncode
            if code != 0:
                raise SystemExit(f"error: {name} exited {code}; see {out / (name + '.log')}")
            traces[method][seed] = real_trace(f"sqlite:///{(out / name / 'optuna.db').resolve()}", name)
            print(f"{name}: {traces[method][seed].trials} trials, {traces[method][seed].pruned} pruned, "
                  f"best eval/loss at B {traces[method][seed].best_at(budget)[0]:.4g} ({time.perf_counter() - start:.0f} s)", flush=True)
    real_rows, real_target = summarise(traces, budget)
    print(f"real studies ({args.seeds} seeds each), target {real_target:.4g}:")
    print(format_rows(real_rows, budget))
    replayed = replay_all(table_raw, list(args.methods), args.replay_seeds, eval_every=args.eval_every, budget=budget,
                          patience=3, min_delta=0.001, baseline=baseline_params(), workers=2)
    rows, target = summarise(replayed, budget)
    print(f"replay ({args.replay_seeds} seeds each), target {target:.4g}:")
    print(format_rows(rows, budget))
    rank = lambda rs: [r["method"] for r in sorted(rs, key=lambda r: r["loss@1B"][0])]  # noqa: E731
    print(f"ranking by median best eval/loss at B, real:   {' < '.join(rank(real_rows))}")
    print(f"ranking by median best eval/loss at B, replay: {' < '.join(rank(rows))}")


# ---- CLI --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train random configurations to their full budget (resumable)")
    rec.add_argument("--configs", type=int, default=240, help="configurations the table should hold")
    rec.add_argument("--examples", type=int, default=EXAMPLES)
    rec.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    rec.add_argument("--table", default=str(TABLE))
    rep = sub.add_parser("replay", help="replay studies on the recorded table (trains nothing)")
    from bench import replay as replay_mod

    replay_mod.add_arguments(rep)
    rep.add_argument("--table", default=str(TABLE))
    chk = sub.add_parser("check", help="real tune.py studies at the replay's budget, against the replay")
    chk.add_argument("--methods", nargs="+", default=["random", "tpe_asha_baseline"], choices=sorted(REAL_METHODS))
    chk.add_argument("--seeds", type=int, default=3)
    chk.add_argument("--replay-seeds", type=int, default=100)
    chk.add_argument("--budget-trials", type=float, default=replay_mod.FULL_TRIALS)
    chk.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    chk.add_argument("--out", default=str(ROOT / "bench_out" / "curves_check"))
    chk.add_argument("--table", default=str(TABLE))
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    {"record": record, "replay": replay_mod.main, "check": check}[args.command](args)


if __name__ == "__main__":
    main()
