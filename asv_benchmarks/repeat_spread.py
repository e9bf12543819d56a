"""Run-to-run spread of two asv result files of the same commit: how far a repeat run lands.

asv keeps one result file per commit and environment (``.asv/results/MACHINE/HASH-ENV.json``),
and a second run of the same commit replaces it; copy the first away before the second:

    HISTORY_RANGE='HEAD^!' asv_benchmarks/run.sh history
    cp asv_benchmarks/.asv/results/vm/HASH-*.json /tmp/first.json
    rm asv_benchmarks/.asv/results/vm/HASH-*.json
    HISTORY_RANGE='HEAD^!' asv_benchmarks/run.sh history
    python asv_benchmarks/repeat_spread.py /tmp/first.json \\
        asv_benchmarks/.asv/results/vm/HASH-*.json

Prints, for each benchmark and parameter combination measured in both, the two medians and
second/first - 1, then the largest deviation; exits 1 when it exceeds ``--limit`` (default 5 %).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys


def medians(path: str) -> dict[str, float]:
    """``{"name(params)": median}`` of one asv result file (asv 0.6's format: each benchmark's
    results listed in the order of ``result_columns``)."""
    with open(path) as fh:
        data = json.load(fh)
    columns = data["result_columns"]
    found = {}
    for name, row in data["results"].items():
        entry = dict(zip(columns, row, strict=False))
        values, params = entry["result"], entry["params"]
        if values is None:
            continue
        combinations = list(itertools.product(*params)) if params else [()]
        for combination, value in zip(combinations, values, strict=True):
            if value is not None and value == value:  # skipped: None; failed: NaN
                found[f"{name}({', '.join(combination)})"] = float(value)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--limit", type=float, default=0.05, help="largest |change| allowed")
    args = parser.parse_args(argv)
    first, second = medians(args.first), medians(args.second)
    common = sorted(set(first) & set(second))
    if not common:
        print("repeat_spread.py: no benchmark was measured in both files", file=sys.stderr)
        return 2
    width = max(len(name) for name in common)
    worst = 0.0
    for name in common:
        change = second[name] / first[name] - 1
        worst = max(worst, abs(change))
        print(f"{name:<{width}}  {first[name]:.4g}  {second[name]:.4g}  {change:+.1%}")
    print(
        f"{len(common)} benchmarks; largest run-to-run change {worst:.1%} (limit {args.limit:.0%})"
    )
    return 0 if worst <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
