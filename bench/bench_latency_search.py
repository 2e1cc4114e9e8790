"""Benchmark: DNA with a latency budget (expected latency in the loss) against the data-free latency solve,
at equal training, on the real runtime (issue 16, item 1).

1. **Quality** (the quality protocol's digits task and base model, ``bench/quality_tasks.py``), per seed and
   latency budget ``b`` on ``Target(batch=64)`` (onnxruntime CPU, 1 thread, a batch of 64: at batch 1 the
   16x16 model runs in ~60 us, all overhead): ``fxadapt.transform(base,
   Budget(latency=b), ..., strategy="dna")`` and the data-free ``Budget(latency=b)``; every model is then
   trained to the same number of weight-update steps after the base: DNA's search steps (one weight step
   each, batch 64) count, so the data-free model gets them as extra fine-tuning epochs
   (``ceil(steps * 64 / len(train))``), then both get ``--ft`` epochs (``fxadapt.finetune``, distillation
   from the base). Reported: the latency re-timed interleaved with the original (``measured / b``, goal
   [0.9, 1.0]), test accuracy, and the paired difference.
2. **Landing** on pytorchcv models outside every list (random init, 1x3x224x224, random data for the
   search, ``--zoo-steps`` steps): measured latency / budget of the DNA result.

    python bench/bench_latency_search.py [--seeds 0,1] [--budgets 0.5,0.7] [--steps 120] [--ft 4]
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_tasks import INPUT, digits_task, trained_base  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.hw.target import Target, interleaved  # noqa: E402
from fxadapt.search.dna import SearchConfig  # noqa: E402
from fxadapt.train.finetune import accuracy, finetune  # noqa: E402

ZOO = ("sepreresnet:sepreresnet18", "spnasnet:spnasnet")
TARGET = Target(batch=64)   # the digits model at 16x16 runs in ~60 us at batch 1: overhead, not widths


def retime(model, small, x, runs: int = 30, t: Target | None = None) -> float:
    t = t or TARGET
    med = interleaved({"o": t.compile(model, (x,)), "s": t.compile(small, (x,))}, runs, 3, clock=t.clock)
    return med["s"] / med["o"]


def quality(seed: int, budget: float, data: dict, args) -> dict:
    base = trained_base("digits", data, args.base_epochs, seed)
    x = torch.zeros(INPUT)
    goal = fxadapt.Budget(latency=budget, target=TARGET)
    dna = fxadapt.transform(base, goal, (x,), data=data["train"], val_data=data["val"], strategy="dna",
                            search=SearchConfig(steps=args.steps, seed=seed, progress=False))
    free = fxadapt.transform(base, goal, (x,))
    extra = math.ceil(args.steps * SearchConfig().batch_size / len(data["train"][0]))
    free = finetune(free, data["train"], extra, teacher=base)
    out = {}
    for kind, m in (("dna", dna), ("datafree", free)):
        tuned = finetune(m, data["train"], args.ft, teacher=base)
        out[kind] = {"acc": accuracy(tuned, data["test"]), "lat": retime(base, m, x) / budget}
    out["extra_epochs"] = extra
    return out


def landing(name: str, budget: float, steps: int) -> float:
    module, _, factory = name.partition(":")
    torch.manual_seed(0)
    model = getattr(importlib.import_module(f"pytorchcv.models.{module}"), factory)(pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 3, 224, 224, generator=g), torch.randint(0, 1000, (64,), generator=g))
    out = fxadapt.transform(model, fxadapt.Budget(latency=budget), (x,), data=data, strategy="dna",
                            search=SearchConfig(steps=steps, warmup=steps // 4, batch_size=8, progress=False))
    return retime(model, out, x, 15, Target()) / budget


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--budgets", default="0.5,0.7")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--ft", type=int, default=4)
    p.add_argument("--base-epochs", type=int, default=30)
    p.add_argument("--zoo-steps", type=int, default=8)
    p.add_argument("--no-zoo", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = digits_task()
    budgets = [float(b) for b in args.budgets.split(",")]
    print("| budget | DNA measured/b | DNA test % | data-free measured/b | data-free test % | paired diff | "
          "extra epochs |")
    print("|---|---|---|---|---|---|---|")
    for b in budgets:
        rows = [quality(int(s), b, data, args) for s in args.seeds.split(",")]
        m = statistics.mean
        diffs = [100 * (r["dna"]["acc"] - r["datafree"]["acc"]) for r in rows]
        print(f"| {b} | {m(r['dna']['lat'] for r in rows):.3f} | "
              f"{m(100 * r['dna']['acc'] for r in rows):.2f} | {m(r['datafree']['lat'] for r in rows):.3f} "
              f"| {m(100 * r['datafree']['acc'] for r in rows):.2f} | {m(diffs):+.2f} "
              f"({', '.join(f'{d:+.2f}' for d in diffs)}) | {rows[0]['extra_epochs']} |", flush=True)
    if not args.no_zoo:
        print("\n| pytorchcv model | budget | DNA measured / budget |\n|---|---|---|")
        for name in ZOO:
            for b in budgets:
                print(f"| {name} | {b} | {landing(name, b, args.zoo_steps):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
