"""`python -m lit_sft.evaluator serve|status`: the shared evaluator server and its status.

    python -m lit_sft.evaluator serve --config CONFIG --evaluator.address HOST:PORT [overrides]
    python -m lit_sft.evaluator status --evaluator.address HOST:PORT [--evaluator.key_file FILE]

`serve` takes any config train.py or tune.py takes (the same dotted overrides); its `evaluator`
and `data` sections decide the model, backend, device and problem sets. The key comes from
LIT_SFT_EVALUATOR_KEY or evaluator.key_file, never from the command line. `status` exits 0 when
the server answers (1 when nobody does, 2 on a wrong key or a bad address).
"""

from __future__ import annotations

import sys

from lit_sft.cli import run_cli
from lit_sft.errors import UserError

USAGE = (
    "usage: python -m lit_sft.evaluator serve --config CONFIG --evaluator.address HOST:PORT | "
    "python -m lit_sft.evaluator status --evaluator.address HOST:PORT [--evaluator.key_file FILE]"
)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "status"):
        raise UserError(USAGE)
    if argv[0] == "serve":
        return _serve(argv[1:])
    return _status(argv[1:])


def _serve(argv: list[str]) -> int:
    from lit_sft.config import config_paths, parse
    from lit_sft.evaluator.server import serve
    from lit_sft.yamlfile import read_yaml

    # A tune.py config (with `study:`) is read by tune.py's parser; no --config: tune.py's default.
    loaded = [read_yaml(path, "--config")[1] for path in config_paths(argv)]
    tune = not loaded or any(isinstance(data, dict) and "study" in data for data in loaded)
    serve(parse(argv, tune=tune))
    return 0


def _status(argv: list[str]) -> int:
    import argparse

    from lit_sft.evaluator.keys import load_key
    from lit_sft.evaluator.remote import ServerUnreachable, connect, request

    parser = argparse.ArgumentParser(prog="python -m lit_sft.evaluator status", exit_on_error=False)
    parser.add_argument("--evaluator.address", dest="address", required=True)
    parser.add_argument("--evaluator.key_file", dest="key_file", default=None)
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as err:
        raise UserError(str(err)) from err
    key = load_key(args.key_file)
    try:
        conn = connect(args.address, key)
        try:
            status = request(conn, {"kind": "status"}, args.address)
        finally:
            conn.close()
    except ServerUnreachable as err:
        print(f"no answer: {err}", file=sys.stderr)
        return 1
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """The status as lines a person reads (and a test parses)."""

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    running = status.get("running")
    lines = [
        f"server: {status['address']} pid {status['pid']}, {status['backend']} on {status['device']}, "
        f"engine {'ready' if status['ready'] else 'loading'}, up {status['uptime_s']:.0f} s",
        f"model: {status['model']}",
        f"jobs served: {status['served']}, mean wait in queue: {secs(status['mean_wait_s'])}",
        f"running: {running['client']} job {running['job']} ({running['problems']})" if running else "running: nothing",
        f"clients: {len(status['clients'])}",
    ]
    lines += [f"  {c['name']}: queued {c['queued']}, served {c['served']}, mean wait {secs(c['mean_wait_s'])}" for c in status["clients"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run_cli(main))
