"""Replay ASHA settings on random search's learning curves: which keep the best trial, at what cost.

Input: the random-search studies of a `bench/search_efficiency.py --keep` run. Each of their
complete trials is a full learning curve (eval/loss at every evaluation, by examples seen) of a
random point of the search space. A random search of n trials is a draw of n of those curves in
some order; ASHA on the same draw would have seen the same curves, cut where it pruned them. For
each of many draws this script replays the pruner decision by decision, with the rule the tuner
uses (lit_sft.pruner.promotable; tolerance 0 is Optuna's SuccessiveHalvingPruner), and counts as
search_efficiency.py does: examples trained, trial by trial, until an eval/loss within 1% of the
draw's best.

It isolates the pruner: both sides sample the same random points, so TPE's share of the search
is not in these numbers (search_efficiency.py measures the two together). It trains nothing and
runs in seconds, so it can sweep settings that would take hours to run for real.

    python bench/pruner_replay.py WORKDIR [--n-trials 12] [--draws 400] [--min-resource 1024 512]
        [--reduction-factor 3 2 4] [--tolerance 0.05 0 0.02 0.1]

Columns: examples ratio (ASHA over random search, ratio of sums over draws), kept best (share of
draws where ASHA still reached the target, i.e. did not prune every trial that would have), spent
(all examples ASHA trained over random search's). The last line is the first setting's (the
tuner's defaults when the lists are left as they are).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]  # `python bench/pruner_replay.py` from anywhere
from search_efficiency import TrialRecord, examples_to_reach, format_table, read_trials, target_loss  # noqa: E402

from lit_sft.pruner import promotable  # noqa: E402

Curve = list[tuple[int, float]]


@dataclass(frozen=True)
class Setting:
    min_resource: int
    reduction_factor: int
    tolerance: float

    def __str__(self) -> str:
        return f"min_resource {self.min_resource}, reduction_factor {self.reduction_factor}, tolerance {self.tolerance:g}"


def replay(curves: list[Curve], setting: Setting) -> list[TrialRecord]:
    """The draw as one ASHA worker would have run it: each curve cut at the report it was pruned at."""
    from optuna.study import StudyDirection

    rungs: dict[int, list[float]] = {}
    out = []
    for number, curve in enumerate(curves):
        rung, kept = 0, []
        for step, value in curve:
            kept.append((step, value))
            pruned = False
            while step >= setting.min_resource * setting.reduction_factor**rung:
                competing = rungs.setdefault(rung, []) + [value]
                rungs[rung].append(value)
                if not promotable(value, competing, setting.reduction_factor, StudyDirection.MINIMIZE, setting.tolerance):
                    pruned = True
                    break
                rung += 1
            if pruned:
                break
        out.append(TrialRecord(number=number, state="PRUNED" if len(kept) < len(curve) else "COMPLETE", curve=kept))
    return out


def measure(pool: list[Curve], setting: Setting, n_trials: int, draws: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)  # the same draws for every setting
    to_target = {"asha": 0, "random": 0}
    spent = {"asha": 0, "random": 0}
    kept = 0
    for _ in range(draws):
        curves = rng.sample(pool, n_trials)
        target = target_loss(min(v for c in curves for _, v in c))
        methods = {"random": [TrialRecord(number=i, state="COMPLETE", curve=c) for i, c in enumerate(curves)], "asha": replay(curves, setting)}
        for method, trials in methods.items():
            reached, _, total = examples_to_reach(trials, target)
            to_target[method] += reached if reached is not None else total
            spent[method] += total
            kept += method == "asha" and reached is not None
    return {"ratio": to_target["asha"] / to_target["random"], "kept": kept / draws, "spent": spent["asha"] / spent["random"]}


def load_pool(workdir: Path) -> list[Curve]:
    pool = []
    for folder in sorted(workdir.glob("se-random-s*")):
        if folder.is_dir():
            pool += [t.curve for t in read_trials(folder, folder.name) if t.state == "COMPLETE" and t.curve]
    return pool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="a bench/search_efficiency.py --keep work folder (or its --random-from)")
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--min-resource", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--reduction-factor", type=int, nargs="+", default=[3, 2, 4])
    parser.add_argument("--tolerance", type=float, nargs="+", default=[0.05, 0.0, 0.02, 0.1])
    args = parser.parse_args(argv)
    pool = load_pool(args.workdir)
    if len(pool) < args.n_trials:
        parser.error(f"{args.workdir}: {len(pool)} complete random-search curves, fewer than --n-trials {args.n_trials}")
    print(f"pruner replay: {len(pool)} random-search curves from {args.workdir}, {args.draws} draws of {args.n_trials} trials")
    settings = [Setting(*combo) for combo in itertools.product(args.min_resource, args.reduction_factor, args.tolerance)]
    results = {s: measure(pool, s, args.n_trials, args.draws) for s in settings}
    rows = [[s.min_resource, s.reduction_factor, s.tolerance, f"{r['ratio']:.3f}", f"{r['kept']:.0%}", f"{r['spent']:.3f}"] for s, r in results.items()]
    print(format_table(["min_resource", "reduction_factor", "tolerance", "examples ratio", "kept best", "spent"], rows))
    first = settings[0]
    print(f"examples_ratio ({first}): {results[first]['ratio']:.3f}, best kept in {results[first]['kept']:.0%} of draws")
    return 0


if __name__ == "__main__":
    sys.exit(main())
