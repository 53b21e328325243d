"""One shared evaluator server, 1, 2, 3 trainers: how long evaluations queue, how much training waits.

For each trainer count N: a fresh `python -m lit_sft.evaluator serve` and N `train()` processes,
all on the CPU with a fixed torch thread count per process (OMP_NUM_THREADS), all on one config
(the embedded tiny model, generated data). Each trainer posts a checkpoint every `--every` steps.

Reported per N: the evaluations' wait in the server's queue (mean, max), seconds per evaluation
in the engine, and per trainer the share of its fit spent in the checkpoint poster's hooks while
it trains (writing the weights file, posting, polling): what evaluation blocks training. The
final wait for the last results after the last step is reported apart. The last line per N is `trainers N: queue_wait_mean_s X blocked_fraction_mean Y`.

    python bench/shared_evaluator.py [--trainers 1 2 3] [--steps 60] [--every 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trainer")
    parser.add_argument("--every", type=int, default=10, help="post a checkpoint every N steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-problems", type=int, default=16, help="problems generated and graded per evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every process (server and trainers)")
    parser.add_argument("--out", default=None, help="work folder; default: a temporary one")
    parser.add_argument("--trainer", default=None, help=argparse.SUPPRESS)  # internal: run one trainer, write JSON here
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_config(args: argparse.Namespace, out: Path, address: str) -> Path:
    import yaml

    from lit_sft.weights import resolve_model_path

    config = {
        "output_dir": str(out / "train"),
        "model": {"model_name_or_path": resolve_model_path(None), "learning_rate": 1e-3},
        "data": {"num_generated": 800, "batch_size": args.batch_size, "eval_size": 16,
                 "num_validation_problems": args.num_problems, "max_length": 128},
        "trainer": {"max_steps": args.steps, "val_check_interval": args.every, "accelerator": "cpu",
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 1},
        "budget": {"examples": None, "eval_every_examples": None},
        "early_stopping": {"enabled": False},
        "evaluator": {"address": address, "num_problems": args.num_problems, "max_new_tokens": args.max_new_tokens,
                      "batch_size": args.num_problems, "device": "cpu", "backend": "transformers", "final_wait_s": 600},
        "wandb": {"enabled": False},
    }
    path = out / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def trainer(args: argparse.Namespace) -> None:
    """One trainer process: train() on the config, its poster's figures to --trainer."""
    from lit_sft.config import parse
    from lit_sft.training import train

    cfg = parse(["--config", args.config])
    cfg["output_dir"] = str(Path(cfg["output_dir"]) / f"t{os.getpid()}")
    result = train(cfg, run_name=f"t{os.getpid()}")
    evaluations = [{k: e.get(k) for k in ("status", "seconds", "queued_s")} for e in result["evaluations"]]
    Path(args.trainer).write_text(json.dumps({
        "fit_s": result["seconds"], "blocked": result["evaluator_blocked"], "evaluations": evaluations,
    }))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_count(args: argparse.Namespace, out: Path, n: int, env: dict[str, str]) -> dict:
    address = f"127.0.0.1:{free_port()}"
    config = write_config(args, out, address)
    log = open(out / f"server-{n}.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "lit_sft.evaluator", "serve", "--config", str(config)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "engine ready" not in (out / f"server-{n}.log").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((out / f"server-{n}.log").read_text())
            time.sleep(0.2)
        outs = [out / f"trainer-{n}-{i}.json" for i in range(n)]
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, __file__, "--trainer", str(o), "--config", str(config)], cwd=ROOT, env=env)
                 for o in outs]
        codes = [p.wait() for p in procs]
        wall = time.perf_counter() - start
        if any(codes):
            raise SystemExit(f"trainer exit codes {codes}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()
    runs = [json.loads(o.read_text()) for o in outs]
    evals = [e for r in runs for e in r["evaluations"] if e["status"] == "ok"]
    waits = [e["queued_s"] for e in evals]
    # While training: writing and posting weights, polling. The final wait (results still in
    # flight when the last step is done) is reported apart: a study's next trial would not wait.
    fractions = [(r["blocked"]["post"] + r["blocked"]["poll"]) / r["fit_s"] for r in runs]
    return {
        "trainers": n, "wall_s": wall, "evaluations": len(evals),
        "queue_wait_mean_s": statistics.mean(waits), "queue_wait_max_s": max(waits),
        "eval_s_mean": statistics.mean(e["seconds"] for e in evals),
        "fit_s_mean": statistics.mean(r["fit_s"] for r in runs),
        "blocked_fraction_mean": statistics.mean(fractions), "blocked_fraction_max": max(fractions),
        "final_wait_s_mean": statistics.mean(r["blocked"]["final_wait"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trainer:
        trainer(args)
        return 0
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           # a fresh key per bench: never written anywhere
           "LIT_SFT_EVALUATOR_KEY": os.environ.get("LIT_SFT_EVALUATOR_KEY") or secrets.token_urlsafe(32)}
    with tempfile.TemporaryDirectory(prefix="shared-evaluator-") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        print(f"cpu cores: {os.cpu_count()}, {threads} torch thread(s) per process; {args.steps} steps, "
              f"checkpoint every {args.every}; {args.num_problems} problems x {args.max_new_tokens} new tokens", flush=True)
        for n in args.trainers:
            r = run_count(args, out, n, env)
            print(f"trainers {n}: {r['evaluations']} evaluations, {r['eval_s_mean']:.2f} s each in the engine; "
                  f"queue wait mean {r['queue_wait_mean_s']:.2f} s, max {r['queue_wait_max_s']:.2f} s; "
                  f"fit {r['fit_s_mean']:.1f} s, blocked fraction mean {r['blocked_fraction_mean']:.4f}, "
                  f"max {r['blocked_fraction_max']:.4f}; final wait {r['final_wait_s_mean']:.2f} s; wall {r['wall_s']:.1f} s", flush=True)
            print(f"trainers {n}: queue_wait_mean_s {r['queue_wait_mean_s']:.3f} blocked_fraction_mean {r['blocked_fraction_mean']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
