"""Check mutants that mutmut reports as "no tests" against tests chosen by hand.

mutmut maps a test to a function by tracing calls in the test's own process, so code that runs
elsewhere gets no test: `grading._child_main` (a forked grading child), vLLM's engine code
(`WeightFileLoader` runs inside the engine). The mutant is still active there: mutmut selects
it through the MUTANT_UNDER_TEST environment variable, which child processes inherit. This runs
the given pytest arguments once per matching mutant, in mutmut's `mutants/` folder, and says
which were killed.

    python tools/mutation_env.py WORK_DIR REGEX [--python PY] -- PYTEST_ARGS...
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def mutant_names(work: Path, pattern: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[0].strip() for line in out.splitlines() if "__mutmut_" in line]
    return [n for n in names if re.search(pattern, n)]


def check(work: Path, name: str, python: str, pytest_args: list[str], timeout_s: float) -> str:
    env = {**os.environ, "MUTANT_UNDER_TEST": name, "WANDB_MODE": "offline"}
    try:
        result = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args],
                                cwd=work / "mutants", env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout"
    if result.returncode == 0:
        return "survived"
    if result.returncode == 1:
        return "killed"
    raise RuntimeError(f"{name}: pytest exited {result.returncode} (not a test failure):\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("pattern")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the tests (the vLLM venv's for engine code)")
    parser.add_argument("--timeout-s", type=float, default=900)
    parser.add_argument("pytest_args", nargs="+")
    args = parser.parse_args()
    # The harness must be able to fail: with every trampoline raising, the tests must not pass.
    if check(args.work, "fail", args.python, args.pytest_args, args.timeout_s) != "killed":
        sys.exit("the chosen tests pass with every mutated function raising: they do not run the mutated code")
    names = mutant_names(args.work, args.pattern)
    verdicts = {}
    for i, name in enumerate(names, 1):
        started = time.monotonic()
        verdicts[name] = check(args.work, name, args.python, args.pytest_args, args.timeout_s)
        print(f"[{i}/{len(names)}] {verdicts[name]:8} {name} ({time.monotonic() - started:.0f} s)", flush=True)
    killed = sum(v in ("killed", "timeout") for v in verdicts.values())
    print(f"\n{killed} of {len(names)} killed by: pytest {' '.join(args.pytest_args)}")
    for name, verdict in verdicts.items():
        if verdict == "survived":
            print(f"survived: {name}")


if __name__ == "__main__":
    main()
