"""Zoo sweep report: capture + analyse every model of ``../shared/zoo/pytorchcv.tsv`` and compare groups
with Torch-Pruning 1.6.1.

    python bench/zoo_report.py                 # whole zoo, table + totals
    python bench/zoo_report.py resnet20_cifar10 mobilenetv2_w1   # a few factories
    python bench/zoo_report.py --no-oracle     # skip the Torch-Pruning comparison

Columns: captured / analysed / cost within 1% of FlopCounterMode / TP partition agreement, seconds, and the
failure reason (or the first differing groups). Totals at the end are the numbers for the closing note.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo_harness as zh  # noqa: E402


def _mark(b: bool) -> str:
    return "y" if b else "-"


def _oracle_cell(o) -> tuple[str, str]:
    if o is None:
        return "", ""
    if not o.ok:
        return "tp-fail", o.failure
    left_out = f" [{o.unmatched[0]} modules only ours, {o.unmatched[1]} only TP]" if any(o.unmatched) else ""
    if o.agree:
        return "agree", left_out.strip()
    return o.category, f"{left_out.strip()} ours-only {_short(o.only_ours)} / tp-only {_short(o.only_tp)}"


def _short(groups: list) -> str:
    return "; ".join("{" + ", ".join(g[:3]) + (f", +{len(g) - 3}" if len(g) > 3 else "") + "}"
                     for g in groups[:3]) + (f" (+{len(groups) - 3} groups)" if len(groups) > 3 else "")


def _reason_kind(reason: str) -> str:
    """A frozen reason without the node name it starts with and the tensor names it mentions."""
    return re.sub(r"fixed-size tensor \S+", "fixed-size tensor <name>", re.sub(r"^\w+: ", "", reason))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("factories", nargs="*", help="only these factories (default: all)")
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--reasons", action="store_true", help="also tally why groups are frozen, over all models")
    args = p.parse_args(argv)
    entries = [e for e in zh.zoo_entries() if not args.factories or e.factory in args.factories]
    tot = dict(tried=0, captured=0, analyzed=0, cost_ok=0, groups_ok=0, untouched=0, tp_built=0, tp_agree=0)
    diffs: dict[str, list[str]] = {}
    reasons: Counter = Counter()
    print(f"{'model':28} cap ana cost  tp           sec  groups  note", flush=True)
    for e in entries:
        model, x = zh.build(e)
        r = zh.check_model(e.factory, model, x)
        o = None if args.no_oracle or not r.analyzed else zh.oracle(e.factory, model, x, r.analysis)
        tp, note = _oracle_cell(o)
        for k in ("captured", "analyzed", "cost_ok", "groups_ok", "untouched"):
            tot[k] += bool(getattr(r, k))
        tot["tried"] += 1
        tot["tp_built"] += bool(o and o.ok)
        tot["tp_agree"] += bool(o and o.agree)
        if o and o.ok and not o.agree:
            diffs[o.category] = diffs.get(o.category, []) + [e.factory]
        if r.analyzed:
            reasons.update(_reason_kind(g.reason) for g in r.analysis.groups if not g.prunable)
        groups = f"{r.n_prunable}/{r.n_groups}"
        print(f"{e.factory:28} {_mark(r.captured)}   {_mark(r.analyzed)}   {_mark(r.cost_ok)}    {tp:12} "
              f"{r.seconds:5.1f}  {groups:7} {r.failure or note}", flush=True)
    print("\ntotals: " + "  ".join(f"{k}={v}" for k, v in tot.items()))
    for cat, names in sorted(diffs.items()):
        print(f"TP differences, {cat}: {', '.join(names)}")
    if args.reasons:
        print("\nfrozen groups by reason (all models):")
        for why, n in reasons.most_common():
            print(f"  {n:5}  {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
