"""Cached rows of the users' protocols (bench/users_protocol.py: images, bench/users_protocol_sr.py: SR).

A row is one method at one budget for one run (base seed, fine-tune seed), keyed by ``(method, budget,
base, seed, config hash)``; rows are appended as JSON lines and the cache is re-read before every row, so
processes given other runs skip each other's finished work and an interrupted run resumes. ``proto`` is
the protocol's module: ``ROWS``, ``TASK``, ``W``, ``users_task()``, ``trained_base(data, b)``,
``base_steps(data)``, ``row_hash(method)`` and ``run_row(method, base, b, data, budget, seed)``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from types import ModuleType

import torch
from quality import provenance


def key(r: dict) -> tuple:
    return r["method"], r["budget"], r["base"], r["seed"], r["config_hash"]


def load_rows(path: str) -> list[dict]:
    """The cached rows at ``path``, the last of each key."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return list({key(r): r for r in rows}.values())


def run(proto: ModuleType, runs, budgets, methods, floor_seeds) -> None:
    """Rows of ``runs`` ((base, seed) pairs), budget-major in the order given (an interrupted run leaves
    every finished budget with as many runs as possible); ``scratch-W`` only for seeds in ``floor_seeds``."""
    data = proto.users_task()
    bases = {b: proto.trained_base(data, b) for b in sorted({b for b, _ in runs})}
    for budget in budgets:
        for b, seed in runs:
            for method in methods:
                if method == "scratch-W" and seed not in floor_seeds:
                    continue
                h = proto.row_hash(method)
                if (method, budget, b, seed, h) in {key(r) for r in load_rows(proto.ROWS)}:
                    continue
                row = {"task": proto.TASK, "method": method, "budget": budget, "base": b, "seed": seed,
                       "config_hash": h, "W": proto.W, "base_steps": proto.base_steps(data)}
                row |= proto.run_row(method, bases[b], b, data, budget, seed) | provenance()
                print(json.dumps(row), flush=True)
                with open(proto.ROWS, "a") as f:
                    f.write(json.dumps(row) + "\n")


def write_results(path: str, text: str, res: dict) -> None:
    """The tables as ``path.md`` and their numbers as ``path.json``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".md", "w") as f:
        f.write(text + "\n")
    with open(path + ".json", "w") as f:
        json.dump(res, f, indent=1)


def main(proto: ModuleType, argv=None, seeds: str = "0,1,2,3") -> int:
    """The protocol's command line: rows for base x seed runs (or ``--runs``), ``--bases-only``,
    ``--data-only``, ``--report`` (the tables from the cache)."""
    p = argparse.ArgumentParser(description=proto.__doc__.split("\n\n")[0])
    p.add_argument("--bases", default="0,1,2")
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--runs", default=None, help="base:seed pairs in order (default: seeds x bases)")
    p.add_argument("--floor-seeds", default=None, help="seeds that also run scratch-W (default: all)")
    p.add_argument("--budgets", default=",".join(map(str, proto.BUDGETS)))
    p.add_argument("--methods", default=",".join(proto.METHODS),
                   help=f"from {', '.join(proto.METHODS + proto.ABLATIONS)}")
    p.add_argument("--data-only", action="store_true", help="generate / cache the splits, nothing else")
    p.add_argument("--bases-only", action="store_true", help="train / cache the bases, no rows")
    p.add_argument("--report", action="store_true", help="only the tables from the cache")
    p.add_argument("--no-report", action="store_true", help="rows only, no tables")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    if args.data_only or args.bases_only:
        data = proto.users_task()
        for b in ints(args.bases) if args.bases_only else []:
            proto.trained_base(data, b)
        return 0
    if not args.report:
        runs = [tuple(map(int, r.split(":"))) for r in args.runs.split(",")] if args.runs else \
            [(b, s) for s in ints(args.seeds) for b in ints(args.bases)]
        run(proto, runs, [float(b) for b in args.budgets.split(",")],
            [m for m in args.methods.split(",") if m], ints(args.floor_seeds or args.seeds))
    if not args.no_report:
        print(proto.report())
    return 0


def indexed(proto: ModuleType, rows: list[dict]) -> tuple[dict, list, list, list[dict]]:
    """``(by, runs, budgets, rows)``: the rows of the methods' current configs, indexed by ``(method,
    budget, base, seed)``, the runs (base, seed) and the budgets (largest first)."""
    cur = {m: proto.row_hash(m) for m in proto.METHODS + proto.ABLATIONS}
    rows = [r for r in rows if cur.get(r["method"]) == r["config_hash"]]
    by = {(r["method"], r["budget"], r["base"], r["seed"]): r for r in rows}
    return by, sorted({(r["base"], r["seed"]) for r in rows}), sorted({r["budget"] for r in rows},
                                                                      reverse=True), rows


def paired_diff(by: dict, runs: list, bud: float, method: str, baselines: tuple, keys: tuple[str, str]):
    """``(best, runs, {key: differences})``: ``method`` minus the baseline with the highest mean of
    ``keys[1]`` (the validation metric) over the runs all of them have, paired per run; ``None`` when no
    run has them all."""
    paired = [r for r in runs if all((k, bud) + r in by for k in (method,) + baselines)]
    if not paired:
        return None
    best = max(baselines, key=lambda k: sum(by[(k, bud) + r][keys[1]] for r in paired))
    diff = {k: [by[(method, bud) + r][k] - by[(best, bud) + r][k] for r in paired] for k in keys}
    return best, paired, diff
