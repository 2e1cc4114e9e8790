"""Benchmark: latency budgets on the real runtime, the latency predictor's error and the lookup table's cost.

For each model (pytorchcv, random init, eval, 1x3x224x224, batch 1) on ``fxadapt.hw.Target()``
(onnxruntime CPU, one intra-op and one inter-op thread; runs timed by the thread's CPU time):

1. **Latency budgets** 0.5 and 0.7: ``fxadapt.planning.latency.solve_latency`` (lookup table + remainder,
   bisection on the aligned global scale, greedy fill, measured repair), then the adapted models and the
   original are timed again in one interleaved run; the table gives the measured latency / budget (the
   goal: within [0.9, 1.0]), the MACs ratio and the repairs used.
2. **Lookup table**: entries measured and the seconds spent measuring them, from an empty cache (a fresh
   ``FXADAPT_CACHE_DIR``), and the solve time.
3. **Predictor**: ``--samples`` sub-networks (``fxadapt.planning.predictor.sample_units``, aligned) timed end
   to end; relative error of the MLP predictor on held-out samples (5-fold), mean / 95th percentile / share
   within 10%; the MAC-ratio baseline (latency ratio = MACs ratio) beside it.

    python bench/bench_latency_budget.py [--models mobilenetv2_w1,resnet50] [--samples 24] [--runs 15]
    python bench/bench_latency_budget.py --models sepreresnet:sepreresnet18,spnasnet:spnasnet --samples 0

A model outside ``MODELS`` is named ``<pytorchcv module>:<factory>``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    "resnet50": "pytorchcv.models.resnet",
    "mobilenetv2_w1": "pytorchcv.models.mobilenetv2",
    "efficientnet_b0": "pytorchcv.models.efficientnet",
    "mobilenetv3_large_w1": "pytorchcv.models.mobilenetv3",
    "densenet121": "pytorchcv.models.densenet",
}
BUDGETS = (0.5, 0.7)


@functools.cache
def load(name: str):
    module, _, factory = name.rpartition(":")
    module = f"pytorchcv.models.{module}" if module else MODELS[factory]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(importlib.import_module(module), factory)(pretrained=False).eval()
    return model, torch.randn(1, 3, 224, 224)


def run_model(name: str, samples: int, runs: int) -> dict:
    import fxadapt
    from fxadapt.hw.lut import LUT
    from fxadapt.hw.target import Target, interleaved
    from fxadapt.planning import predictor as P
    from fxadapt.planning.budget import Budget
    from fxadapt.planning.latency import Measurer, solve_latency

    model, x = load(name)
    target = Target()
    a = fxadapt.analyze(model, (x,))
    meas = Measurer(a, target, runs=runs)
    lut = LUT(target, progress=False)
    out = {"base_ms": meas.base * 1e3, "budgets": {}}
    sols = {}
    for b in BUDGETS:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sol = solve_latency(a, Budget(latency=b), target, lut=lut, measure=meas, progress=False)
        sols[b] = sol
        out["budgets"][b] = {"solve_s": time.perf_counter() - t0, "attempts": len(sol.history),
                             "macs_ratio": a.cost.macs(sol.units) / a.cost.macs(),
                             "solver_ratio": sol.ratio, "warned": bool(w)}
    out["lut_entries"], out["lut_s"] = lut.measured, lut.measure_s
    # fresh, interleaved check of the results against the original
    fns = {"orig": meas.orig} | {b: target.compile(meas.model(s.units), meas.inputs) for b, s in sols.items()}
    med = interleaved(fns, runs, 3, clock=target.clock)
    for b in BUDGETS:
        out["budgets"][b]["check_ratio"] = med[b] / med["orig"]
    if samples:
        units = P.sample_units(a, samples, align=target.align(), seed=1)
        X, lm = P.encode(a, units)
        t0 = time.perf_counter()
        y = P.collect(a, units, meas, progress=False)
        err = P.cross_validate(X, lm, y, folds=5)
        out["pred"] = P.summary(err) | {"collect_s": time.perf_counter() - t0}
        out["macs_base"] = P.summary(np.abs(np.exp(lm - y) - 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--samples", type=int, default=24, help="sub-networks timed for the predictor (0: skip)")
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--keep-cache", action="store_true", help="use the user cache (default: a fresh one)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if not args.keep_cache:
        os.environ["FXADAPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxadapt-cache-")
    res = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        res[name] = run_model(name, args.samples, args.runs)
        print(f"{name}: {time.perf_counter() - t0:.0f} s {res[name]}", file=sys.stderr, flush=True)
    from fxadapt.export.report import table

    rows = []
    for name, r in res.items():
        for b, v in r["budgets"].items():
            rows.append([name, f"{r['base_ms']:.2f}", b, f"{v['check_ratio'] / b:.3f}",
                         f"{v['solver_ratio'] / b:.3f}", f"{v['macs_ratio']:.3f}", v["attempts"],
                         f"{v['solve_s']:.1f}"])
    print("Latency budgets (onnxruntime CPU, 1 thread, batch 1; ratios to the original, interleaved)\n")
    print(table(["model", "original ms", "budget", "measured / budget", "in-solver measured / budget",
                 "MACs ratio", "measurements", "solve s"], rows))
    print("\nLookup table (from an empty cache)\n")
    print(table(["model", "entries", "measuring s"],
                [[n, r["lut_entries"], f"{r['lut_s']:.1f}"] for n, r in res.items()]))
    if any("pred" in r for r in res.values()):
        print("\nLatency predictor, held-out relative error (5-fold)\n")
        print(table(["model", "samples", "MLP mean", "MLP p95", "MLP within 10%", "MACs-only mean",
                     "MACs-only within 10%", "timing s"],
                    [[n, r["pred"]["n"], f"{100 * r['pred']['mean']:.1f}%", f"{100 * r['pred']['p95']:.1f}%",
                      f"{100 * r['pred']['within_10']:.0f}%", f"{100 * r['macs_base']['mean']:.1f}%",
                      f"{100 * r['macs_base']['within_10']:.0f}%", f"{r['pred']['collect_s']:.0f}"]
                     for n, r in res.items() if "pred" in r]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
