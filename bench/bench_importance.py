"""Planted allocation (issue 25, task 9a): does data put the widths where the labels come from?

Task: 4 x 8 inputs; branch k of the base reads only its own 8 (``Planted``: per branch Linear(8, 32) -> ReLU
-> Linear(32, 10), the branches' logits summed). Labels are ``argmax_c sum_k FACTORS[k] * T_k(x_k)`` with a
random two-layer teacher ``T_k`` per branch, each scaled to unit std: branch k's share of the labels is
known (FACTORS, 8 : 4 : 2 : 1), so the right allocation keeps the widest branch where the factor is largest.

Protocol: the base is trained ``BASE`` steps (about 40x the recovery budget); every method then gets the same
``W`` SGD weight steps after it (a search's weight steps count), and every fine-tune distils from the base
(``fxadapt.finetune``, kd 0.5). Methods: data-free (L1, one global scale; W fine-tune), importance (its
default: W/2 distillation steps while pruning in 3 steps, then W/2 fine-tune), FUR (2 iterations of W/4,
then W/2 fine-tune). Reported over seeds: the Spearman rank correlation of the kept branch widths with
FACTORS, how many seeds reach >= 0.8, and test accuracy (10k samples) with the paired 95% interval against
data-free.

    python bench/bench_importance.py --seeds 0-9 --budget 0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
import warnings

import torch
from scipy import stats
from torch import nn

import fxadapt
from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune

FACTORS = (8.0, 4.0, 2.0, 1.0)
D, H, C = 8, 32, 4
BASE, BATCH, TRAIN, TEST = 6000, 64, 4096, 10000


class Planted(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.ModuleList(nn.Linear(D, H) for _ in FACTORS)
        self.outer = nn.ModuleList(nn.Linear(H, C) for _ in FACTORS)

    def forward(self, x):
        return sum(o(torch.relu(i(p))) for i, o, p in zip(self.inner, self.outer, x.split(D, dim=1)))


def task(seed: int) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    teachers = [(torch.randn(D, 64, generator=g), torch.randn(64, C, generator=g)) for _ in FACTORS]

    def label(x):
        parts = [torch.tanh(p @ a / D ** 0.5) @ b for (a, b), p in zip(teachers, x.split(D, dim=1))]
        return sum(f * t / t.std() for f, t in zip(FACTORS, parts)).argmax(1)

    x = torch.randn(TRAIN + 1000 + TEST, D * len(FACTORS), generator=g)
    y = label(x)
    return {"train": (x[:TRAIN], y[:TRAIN]), "val": (x[TRAIN:TRAIN + 1000], y[TRAIN:TRAIN + 1000]),
            "test": (x[TRAIN + 1000:], y[TRAIN + 1000:])}


def base_model(data: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = Planted()
    epochs = BASE // (TRAIN // BATCH)
    finetune(m, data["train"], epochs, cfg=FinetuneConfig(lr=0.05, seed=seed))
    return m.eval()


def widths(model) -> list[int]:
    return [lin.out_features for lin in model.inner]


def method(name: str, base: nn.Module, data: dict, budget: float, seed: int, w: int) -> tuple[nn.Module, int]:
    """(model, its search's weight steps)."""
    x = data["train"][0]
    if name == "datafree":
        return fxadapt.transform(base, budget, (x[:1],), strategy="datafree"), 0
    if name == "importance":
        cfg = fxadapt.ImportanceConfig(seed=seed, steps=w // 2)
        model = fxadapt.transform(base, budget, (x[:1],), data=data["train"], strategy="importance",
                                  importance=cfg)
        return model, sum("step" in h for h in fxadapt.report(model).history)
    cfg = dataclasses.replace(fxadapt.FurConfig(), seed=seed, progress=False, iterations=2,
                              train_steps=w // 4)
    model = fxadapt.transform(base, budget, (x[:1],), data=data["train"], strategy="fur", fur=cfg)
    return model, 2 * (w // 4)


def interval(v: list[float]) -> str:
    m = statistics.mean(v)
    h = float(stats.t.ppf(0.975, len(v) - 1)) * statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 \
            else math.nan
    return f"{m:+.2f} ± {h:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-9")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--w", type=int, default=128, help="weight steps after the base, for every method")
    p.add_argument("--methods", default="datafree,importance,fur")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1)) if "," not in args.seeds \
            else [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    spe = TRAIN // BATCH
    res = {m: {"rho": [], "acc": [], "widths": [], "s": []} for m in methods}
    for seed in seeds:
        data = task(seed)
        base = base_model(data, seed)
        line = [f"seed {seed}: base {100 * accuracy(base, data['test']):.2f}%"]
        for name in methods:
            t0 = time.perf_counter()
            model, steps = method(name, base, data, args.budget, seed, args.w)
            took = time.perf_counter() - t0
            left = args.w - steps
            if left > 0:   # finetune runs whole epochs of spe steps: W is a multiple of spe here
                finetune(model, data["train"], max(1, round(left / spe)), teacher=base,
                         cfg=FinetuneConfig(seed=seed))
            wd = widths(model)
            rho = stats.spearmanr(wd, FACTORS)[0]
            res[name]["rho"].append(0.0 if math.isnan(rho) else float(rho))
            res[name]["acc"].append(100 * accuracy(model, data["test"]))
            res[name]["widths"].append(wd)
            res[name]["s"].append(took)
            line.append(f"{name} {wd} rho {res[name]['rho'][-1]:.2f} acc {res[name]['acc'][-1]:.2f} "
                        f"({took:.1f}s)")
        print("; ".join(line), flush=True)
    print(f"\nbudget {args.budget}x MACs, W = {args.w} weight steps after a {BASE}-step base, {len(seeds)} "
          "seeds")
    print("| method | Spearman(widths, factors) mean | seeds >= 0.8 | test acc % | paired vs data-free | s |")
    print("|---|---|---|---|---|---|")
    for name in methods:
        r = res[name]
        diff = ([a - b for a, b in zip(r["acc"], res["datafree"]["acc"])] if "datafree" in res
                and name != "datafree"
                else None)
        good = sum(round(v, 6) >= 0.8 for v in r["rho"])
        print(f"| {name} | {statistics.mean(r['rho']):.2f} | {good}/{len(seeds)} "
              f"| {interval(r['acc']).lstrip('+')} | {interval(diff) if diff else '-'} | "
              f"{statistics.mean(r['s']):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
