"""Benchmark: ``fxadapt.transform`` (data-free, 0.5 of the MACs) next to Torch-Pruning's prune, same run.

For each pytorchcv model (1x3x224x224, eval mode, random weights), interleaved, ``--repeats`` times:

- ``fxadapt``: ``fxadapt.transform(model, 0.5, (x,))`` end to end (capture, analysis, solve, materialize,
  rewire, verify — the verification runs the model and counts its MACs independently); the per-step
  split is taken from the report's ``timings``;
- ``tp``: ``torch_pruning.pruner.MagnitudePruner(model, x, pruning_ratio=0.5, ignored_layers=[classifier])
  .step()`` on a deep copy (dependency graph build + pruning; no verification).

Prints medians and the ratio fxadapt / TP (issue 7 target: at most 2x). Run with ``--threads 1`` on a
loaded machine::

    python bench/bench_transform.py [--models resnet50,mobilenetv2_w1] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import time

import torch

import fxadapt

MODELS = {
    "resnet50": ("pytorchcv.models.resnet", "resnet50"),
    "mobilenetv2_w1": ("pytorchcv.models.mobilenetv2", "mobilenetv2_w1"),
}


def load(name: str):
    module, factory = MODELS[name]
    torch.manual_seed(0)
    return getattr(importlib.import_module(module), factory)().eval(), torch.randn(1, 3, 224, 224)


def run_fxadapt(model, x) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fxadapt.transform(model, 0.5, (x,))
    return time.perf_counter() - t0, dict(fxadapt.report(out).timings)


def run_tp(model, x) -> float:
    import torch_pruning as tp

    t0 = time.perf_counter()
    m = copy.deepcopy(model)
    head = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))][-1:]
    tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                              ignored_layers=head).step()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model, x = load(name)
        run_fxadapt(model, x), run_tp(model, x)  # warm-up (imports, first export)
        ours, theirs, steps = [], [], []
        for _ in range(args.repeats):
            t, split = run_fxadapt(model, x)
            ours.append(t)
            steps.append(split)
            theirs.append(run_tp(model, x))
        split = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        rows.append((name, statistics.median(ours), statistics.median(theirs), split))
    print("| model | fxadapt transform s | TP prune s | ratio | fxadapt steps (median s) |")
    print("|---|---:|---:|---:|---|")
    for name, a, b, split in rows:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in split.items())
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} | {steps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
