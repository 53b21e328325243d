"""Per-module mutation score from `mutmut results --all true` (read on stdin).

    python -m mutmut results --all true | python tools/mutation_score.py [--survivors]
"""

from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict

# mutmut names a mutant <module>.x_<function>__mutmut_<n> or <module>.xǁ<Class>ǁ<method>__mutmut_<n>.
NAME = re.compile(r"^\s*(?P<name>(?P<module>[\w.]+?)\.x[_ǁ]\S+__mutmut_\d+): (?P<status>.+)$")
DETECTED = {"killed", "timeout", "segfault", "caught by type check"}


def tally(lines: list[str]) -> tuple[dict[str, Counter], list[str]]:
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    for line in lines:
        m = NAME.match(line)
        if not m:
            continue
        status = m["status"].strip()
        counts[m["module"]][status] += 1
        if status not in DETECTED | {"not checked"}:
            survivors.append(f"{m['name']}: {status}")
    return counts, survivors


def table(counts: dict[str, Counter]) -> str:
    rows = ["| module | mutants checked | killed | of which timeouts | survived | no tests | not checked | score |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = Counter()
    for module in sorted(counts):
        c = counts[module]
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("**all**", total))
    return "\n".join(rows)


def _row(module: str, c: Counter) -> str:
    n = sum(c.values()) - c["skipped"] - c["not checked"]
    killed = sum(c[s] for s in DETECTED)
    score = f"{100 * killed / n:.1f}%" if n else "-"
    return f"| {module} | {n} | {killed} | {c['timeout']} | {c['survived']} | {c['no tests']} | {c['not checked']} | {score} |"


if __name__ == "__main__":
    counts, survivors = tally(sys.stdin.read().splitlines())
    print(table(counts))
    if "--survivors" in sys.argv:
        print("\n".join(["", "Not killed:"] + survivors))
