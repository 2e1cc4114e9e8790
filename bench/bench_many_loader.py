"""Benchmark: three budgets from one DNA search against one single-budget search, data from a ``DataLoader``
(issue 28, item 4: a loader was iterated up to each budget's far batch offset, 9.33x one search).

A map-style dataset of 4096 random 3x8x8 images that counts every sample it serves, a shuffled
``DataLoader`` (batch 32), the tests' ``ResNetTiny``; ``transform(model, 0.5, ...)`` then ``transform(model,
[0.25, 0.5, 0.75], ...)`` then the single search again (the faster single run is the reference: the machine
is shared). Prints wall time and samples read per run and the ratio (target <= 1.5x).

    python bench/bench_many_loader.py [--steps 80]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from models import ResNetTiny  # noqa: E402

import fxadapt  # noqa: E402


class Images(Dataset):
    def __init__(self, n: int):
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads += 1
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 8, 8, generator=g), int(torch.randint(0, 5, (), generator=g))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=80)
    args = p.parse_args()
    torch.manual_seed(0)
    model, x = ResNetTiny().eval(), torch.randn(1, 3, 8, 8)
    cfg = fxadapt.SearchConfig(steps=args.steps, warmup=10, batch_size=32, progress=False)
    warnings.simplefilter("ignore")
    out = {}
    for name, budget in (("one", 0.5), ("three", [0.25, 0.5, 0.75]), ("one_again", 0.5)):
        ds = Images(4096)
        t0 = time.perf_counter()
        fxadapt.transform(model, budget, (x,), data=DataLoader(ds, batch_size=32, shuffle=True),
                          strategy="dna", search=cfg)
        out[name] = time.perf_counter() - t0
        print(f"{name}: {out[name]:.2f} s, {ds.reads} samples read", flush=True)
    print(f"three budgets / one search = {out['three'] / min(out['one'], out['one_again']):.2f}x")


if __name__ == "__main__":
    main()
