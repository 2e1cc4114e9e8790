"""Cost of one search step against one plain training step (issue 11, item 3), per gate kind and growth.

For the quality protocol's base model (``ExampleResNet``, width 8, 16x16 inputs, batch 64) it measures

- **activation memory**: bytes of the tensors autograd saves for the backward pass (the part of a
  training step's memory that grows with the model; counted with ``torch.autograd.graph.saved_tensors_hooks``,
  deterministic, CPU or CUDA alike) of a plain step on the original model, a DNA weight step and a DNA
  gate step on the gated supernet;
- **wall time** of each step (median of ``--repeats`` after warm-up, one thread);
- the resulting **search / fine-tune ratio** for a search of ``steps`` (``warmup`` weight-only) against a
  fine-tune of ``epochs`` over ``train`` samples of the model at the budget (its step time measured too).

    python bench/bench_search_step.py                       # the supernet configurations in CONFIGS
    python bench/bench_search_step.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
from torch.nn import functional as F

import fxadapt
from fxadapt.examples import ExampleResNet
from fxadapt.search.supernet import SupernetConfig, build_supernet

# the old default (Markov, grown), the default for shrinking budgets (top-2, the model itself), one-path
# Gumbel on the model itself, and the grown space every growth budget searches
CONFIGS = (SupernetConfig(gates="markov"), SupernetConfig(gates="topk", expand=1.0, depth_slots=0),
           SupernetConfig(gates="gumbel", expand=1.0, depth_slots=0), SupernetConfig(gates="topk"))


def saved_bytes(step) -> int:
    """Bytes autograd saves for backward during ``step()`` (each storage once)."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total[0] += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total[0]


def timed(step, repeats: int) -> float:
    for _ in range(3):
        step()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def train_step(model, x, y, params):
    def step():
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()
    return step


def measure(sc: SupernetConfig, budget: float, args) -> dict:
    torch.manual_seed(0)
    model = ExampleResNet(width=8).eval()
    x, y = torch.randn(args.batch, 3, 16, 16), torch.randint(0, 10, (args.batch,))
    a0 = fxadapt.analyze(model, (x[:1],))
    sn = build_supernet(a0, None, sc)
    sn.gm.train()
    if sn.sampled:
        sn.center((budget) ** 0.5)
        sn.resample(torch.Generator().manual_seed(0), 0.5)
    w, g = sn.weight_parameters(), sn.arch_parameters()
    plain_params = list(model.parameters())
    model.train()
    small = fxadapt.transform(model, budget, (x[:1],)).train()
    plain = train_step(model, x, y, plain_params)
    small_step = train_step(small, x, y, list(small.parameters()))

    def only(params_on, params_off):
        def step():
            for p in params_off:
                p.requires_grad_(False)
            try:
                train_step(sn.gm, x, y, params_on)()
            finally:
                for p in params_off:
                    p.requires_grad_(True)
        return step

    weight, gate = only(w, g), only(g, w)
    row = {"gates": sc.gates, "expand": sc.expand, "slots": sc.depth_slots, "budget": budget,
           "mem_plain": saved_bytes(plain), "mem_weight": saved_bytes(weight), "mem_gate": saved_bytes(gate),
           "t_plain": timed(plain, args.repeats), "t_weight": timed(weight, args.repeats),
           "t_gate": timed(gate, args.repeats), "t_small": timed(small_step, args.repeats)}
    gate_steps = args.steps - args.warmup
    search = args.steps * row["t_weight"] + gate_steps * row["t_gate"]
    finetune = args.epochs * (args.train // args.batch) * row["t_small"]
    return row | {"search_over_finetune": search / finetune}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = [measure(sc, args.budget, args) for sc in CONFIGS]
    print("| gates | expand | block slots | weight-step memory / plain | gate-step memory / plain "
          "| weight step / plain s | gate step / plain s | search / fine-tune (model) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gates']} | {r['expand']} | {r['slots']} | {r['mem_weight'] / r['mem_plain']:.2f} | "
              f"{r['mem_gate'] / r['mem_plain']:.2f} | {r['t_weight'] / r['t_plain']:.2f} | "
              f"{r['t_gate'] / r['t_plain']:.2f} | {r['search_over_finetune']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
