"""Issue 25's table from bench/quality.py's cache: each importance method against data-free and against the
best keep-weights baseline (tp-uniform, tp-global, datafree: the one with the highest mean *val* accuracy in
the cell), paired seed by seed, mean ± 95% t-interval, on test and on val (defaults are chosen on val).

    python bench/importance_report.py --seeds 0,1,2,3,4 [--methods importance,importance-depth] [--mode
    recovery]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import load_rows, task_context  # noqa: E402
from quality_report import _cells, _diff, current, reference  # noqa: E402

INHERITED = ("tp-uniform", "tp-global", "datafree")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--task", default="digits")
    p.add_argument("--methods", default="importance")
    p.add_argument("--mode", default="quick", help="quick, or recovery (bench/quality.py --recovery)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    ctx = task_context(args.task, args.mode, "train", train_base=False)
    rows = current(load_rows(args.mode, [args.task]), [ctx], seeds)
    for which in ("", "val"):
        cells, val = _cells(rows, which), _cells(rows, "val")
        print(f"\n{args.task} ({'test' if not which else 'val'}), points, paired over seeds")
        print("| method | budget | mean | vs datafree | vs best keep-weights (chosen on val) |")
        print("|---|---|---|---|---|")
        for (task, budget), cell in cells.items():
            ref = reference(val[(task, budget)], INHERITED)
            for m in args.methods.split(",") + list(INHERITED):
                a = cell.get(m, {})
                if not a:
                    continue
                out = []
                for other in ("datafree", ref):
                    b = cell.get(other, {})
                    d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
                    out.append(f"{_diff(d)} ({len(d)})" if d and m != other else "-")
                mean = 100 * sum(a.values()) / len(a)
                print(f"| {m} | {budget} | {mean:.2f} ({len(a)}) | {out[0]} | {out[1]} (ref {ref}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
