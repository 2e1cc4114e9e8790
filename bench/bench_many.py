"""Benchmark: three budgets from one DNA search against three single-budget searches (issue 16, item 2).

Task: the quality protocol's digits task and base model (``bench/quality_tasks.py``: 1000 train / 300 val /
497 test, ExampleResNet trained for ``--base-epochs``). Per seed: ``fxadapt.transform(base, [0.25, 0.5,
0.75], ..., strategy="dna")`` (one supernet) and ``fxadapt.transform(base, b, ...)`` for each budget
alone, the same ``SearchConfig`` (``--steps``); then every model is fine-tuned alike (``fxadapt.finetune``,
``--ft`` epochs, distillation from the base) and its test accuracy measured. Reported: search time (the
``plan`` step: one search for all vs the sum and the mean of the single searches) and accuracy per budget
(many vs single, paired over seeds).

    python bench/bench_many.py [--seeds 0,1] [--steps 120] [--ft 4] [--base-epochs 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_tasks import INPUT, digits_task, trained_base  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.search.dna import SearchConfig  # noqa: E402
from fxadapt.train.finetune import accuracy, finetune  # noqa: E402

BUDGETS = (0.25, 0.5, 0.75)


def _plan_s(model) -> float:
    return dict(fxadapt.report(model).timings).get("plan", 0.0)


def run_seed(seed: int, data: dict, args) -> dict:
    base = trained_base("digits", data, args.base_epochs, seed)
    x = torch.zeros(INPUT)
    search = SearchConfig(steps=args.steps, seed=seed, progress=False)
    kw = dict(data=data["train"], val_data=data["val"], strategy="dna", search=search)
    t0 = time.perf_counter()
    many = fxadapt.transform(base, list(BUDGETS), (x,), **kw)
    many_s = time.perf_counter() - t0
    search_many = next(h["search_s"] for h in fxadapt.report(many[0]).history if "search_s" in h)
    singles, single_s = [], []
    for b in BUDGETS:
        t0 = time.perf_counter()
        singles.append(fxadapt.transform(base, b, (x,), **kw))
        single_s.append((time.perf_counter() - t0, _plan_s(singles[-1])))
    acc = {}
    for kind, models in (("many", many), ("single", singles)):
        for b, m in zip(BUDGETS, models):
            tuned = finetune(m, data["train"], args.ft, teacher=base)
            acc[kind, b] = accuracy(tuned, data["test"])
    return {"many_s": many_s, "search_many_s": search_many, "single_s": [s[0] for s in single_s],
            "search_single_s": [s[1] for s in single_s], "acc": acc}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--ft", type=int, default=4)
    p.add_argument("--base-epochs", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = digits_task()
    res = [run_seed(int(s), data, args) for s in args.seeds.split(",")]
    mean = statistics.mean
    print(f"search time: one search for {len(BUDGETS)} budgets {mean(r['search_many_s'] for r in res):.1f} "
          f"s; single searches {mean(sum(r['search_single_s']) for r in res):.1f} s in all, "
          f"{mean(mean(r['search_single_s']) for r in res):.1f} s each -> ratio to one single search "
          f"{mean(r['search_many_s'] / mean(r['search_single_s']) for r in res):.2f}")
    print(f"whole transform: many {mean(r['many_s'] for r in res):.1f} s, singles "
          f"{mean(sum(r['single_s']) for r in res):.1f} s")
    print("| budget | many (test %) | single (test %) | paired diff (many - single) |\n|---|---|---|---|")
    for b in BUDGETS:
        diffs = [100 * (r["acc"]["many", b] - r["acc"]["single", b]) for r in res]
        print(f"| {b} | {mean(100 * r['acc']['many', b] for r in res):.2f} | "
              f"{mean(100 * r['acc']['single', b] for r in res):.2f} | {mean(diffs):+.2f} "
              f"({', '.join(f'{d:+.2f}' for d in diffs)}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
