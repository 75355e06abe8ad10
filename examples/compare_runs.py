"""Compare ``moe-mpi bench decode|prefill`` runs: every round of every run, per mode and workload.

A shared VM drifts by tens of percent within minutes, so one run says
little; several runs of two versions, interleaved (A B A B ...), say more.
Give each side's result files::

    python examples/compare_runs.py --a old-1.json old-2.json --b new-1.json new-2.json

It prints, per mode and batch (or prompt length), the tok/s of every round
of every file of each side, each side's median, and B's median over A's.
Rows whose output did not match mlx-lm (``verified`` false) are left out
and counted.
"""

import argparse
import json
import statistics
from collections import defaultdict


def rounds_of(paths):
    """``{(mode, key): [tok/s of every verified round]}`` and how many rounds were wrong."""
    found, wrong = defaultdict(list), 0
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        for rows in result.get("rounds") or [result["rows"]]:
            for row in rows:
                if row.get("skipped"):
                    continue
                key = (row["mode"], row.get("batch", row.get("length")))
                if row.get("verified") is False:
                    wrong += 1
                    continue
                found[key].append(row["tokens_per_s"])
    return found, wrong


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", required=True, help="side A's result files (JSON)")
    parser.add_argument("--b", nargs="+", required=True, help="side B's result files (JSON)")
    args = parser.parse_args(argv)
    a, wrong_a = rounds_of(args.a)
    b, wrong_b = rounds_of(args.b)
    print(f"{'mode':>10} {'B/L':>5} {'A median':>9} {'B median':>9} {'B/A':>6}   rounds A | rounds B (tok/s)")
    for key in sorted(set(a) | set(b), key=lambda k: (k[0], k[1])):
        ma = statistics.median(a[key]) if a.get(key) else None
        mb = statistics.median(b[key]) if b.get(key) else None
        ratio = f"{mb / ma:6.2f}" if ma and mb else "   n/a"
        figures = " ".join(f"{v:.1f}" for v in a.get(key, [])) + " | " + " ".join(f"{v:.1f}" for v in b.get(key, []))
        print(f"{key[0]:>10} {key[1]:>5} {ma or float('nan'):9.1f} {mb or float('nan'):9.1f} {ratio}   {figures}")
    if wrong_a or wrong_b:
        print(f"# rows whose output did not match mlx-lm, left out: A {wrong_a}, B {wrong_b}")


if __name__ == "__main__":
    main()
