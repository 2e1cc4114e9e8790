"""Benchmark: onnxruntime CPU latency of the original model, fxadapt's adaptation and Torch-Pruning's
magnitude pruning at the same MACs.

For each model (pytorchcv, random init, eval, 1x3x224x224) three variants are built and exported the same
way, with ``fxadapt.export_onnx`` (torch.onnx dynamo export + onnxsim + checker + onnxruntime comparison):

- ``original``: the model as built;
- ``fxadapt``:  ``fxadapt.transform(model, 0.5, (x,), solve=SolveConfig(align="auto"))`` (data-free; the
  default alignment of ``fxadapt.hw.Target()``: onnxruntime's NCHWc block on this CPU; BN folded at export);
- ``tp``:       Torch-Pruning 1.6.1 ``MagnitudePruner`` (L1, per-layer ratio, final classifier ignored) at the
  pruning ratio (bisection on the ratio) whose MACs are at most fxadapt's;
- ``tp-r16``:   the same with TP's ``round_to=16`` (every pruned width a multiple of 16);
- ``tp-r16+``:   TP ``round_to=16`` pruned 0.1 deeper, so that TP's MACs *at fxadapt's measured latency* can
  be read off by linear interpolation between the measured TP-r16 points (original, tp-r16, tp-r16+): the
  column "TP-r16 MACs at equal latency" (MACs given up = 1 - that ratio; fxadapt gives up 1 - its MACs
  ratio).

Latency: onnxruntime ``CPUExecutionProvider``, one intra-op and one inter-op thread, sequential execution,
batch 1 (``fxadapt.hw.Target()``); median of ``--runs`` runs after ``--warmup`` warm-up runs, the variants'
runs interleaved so machine load hits all alike, each run timed by the calling thread's CPU time
(``Target.clock``: onnxruntime computes on that thread with one thread, and preemption by other processes
on a shared machine is not counted). The table prints, per variant, MACs (``FlopCounterMode``), latency, and
``(latency / original latency) / (MACs / original MACs)``: 1.0 means latency fell exactly with MACs, above
1.0 that the saved MACs bought less time. ``convs %16`` is the share of conv output widths divisible by 16:
onnxruntime's fast NCHWc convolutions (block 16 on AVX-512) need it, so odd widths can cost more than the
MACs they save (on this machine a 3x3+1x1 conv pair at 63 channels is ~30% slower than at 64).

    python bench/bench_latency.py [--models resnet50,mobilenetv2_w1] [--runs 50] [--warmup 10]
    pytest bench/bench_latency.py --benchmark-enable       # pytest-benchmark, one test per model x variant
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import fxadapt
from fxadapt.analysis.count import count_macs

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache" / "latency"
MODELS: dict[str, str] = {
    "resnet50": "pytorchcv.models.resnet",
    "mobilenetv2_w1": "pytorchcv.models.mobilenetv2",
    "efficientnet_b0": "pytorchcv.models.efficientnet",
    "mobilenetv3_large_w1": "pytorchcv.models.mobilenetv3",
    "densenet121": "pytorchcv.models.densenet",
}
VARIANTS = ("original", "fxadapt", "tp-r16", "tp-r16+")   # "tp" (no rounding): variant(name, "tp")
INPUT_SHAPE = (1, 3, 224, 224)
BUDGET = 0.5
ALIGN = 16    # Torch-Pruning's round_to for the tp-r16 variants


@functools.cache
def load(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """Zoo model ``name`` (random init, eval) and a fixed example input."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(importlib.import_module(MODELS[name]), name)(pretrained=False).eval()
    return model, torch.randn(*INPUT_SHAPE)


@functools.cache
def variant(name: str, kind: str) -> torch.nn.Module:
    """The ``kind`` variant of zoo model ``name`` (see module docstring)."""
    model, x = load(name)
    if kind == "original":
        return model
    from fxadapt.planning.solver import SolveConfig

    ours = fxadapt.transform(model, BUDGET, (x,), solve=SolveConfig(align="auto"))
    if kind == "fxadapt":
        return ours
    if kind == "tp-r16+":
        pruned = tp_prune_at(model, x, tp_ratio(name) + 0.1, ALIGN)
    else:
        pruned = tp_prune(model, x, count_macs(ours, (x,)), ALIGN if kind == "tp-r16" else None, name).eval()
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape, f"{name} {kind}: pruning changed the output shape"
    return pruned


_RATIO: dict = {}


def tp_ratio(name: str) -> float:
    variant(name, "tp-r16")
    return _RATIO[name]


def tp_prune_at(model: torch.nn.Module, x: torch.Tensor, ratio: float,
                round_to: int | None) -> torch.nn.Module:
    import copy

    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    head = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))][-1:]
    tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=min(ratio, 0.95), ignored_layers=head, round_to=round_to).step()
    return m.eval()


def tp_prune(model: torch.nn.Module, x: torch.Tensor, target: float, round_to: int | None,
             name: str = "") -> torch.nn.Module:
    """Torch-Pruning magnitude pruning (per layer, classifier ignored) at the largest ratio <= ``target`` MACs
    (as ``bench/digits_setup.tp_prune``, plus ``round_to``; the classifier is the last conv or linear module:
    pytorchcv's mobilenetv2 ends in a 1x1 conv)."""
    import copy

    import torch_pruning as tp

    def prune(ratio: float) -> torch.nn.Module:
        m = copy.deepcopy(model).eval()
        head = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))][-1:]
        tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=head, round_to=round_to).step()
        return m

    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        m = prune(mid)
        if count_macs(m, (x,)) <= target:
            best, hi = m, mid
        else:
            lo = mid
    if round_to:
        _RATIO[name] = hi
    return best if best is not None else prune(hi)


@functools.cache
def onnx_path(name: str, kind: str) -> str:
    """Export the variant with ``fxadapt.export_onnx`` (raises ``ExportError`` on any failed step)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = str(CACHE / f"{name}-{kind}.onnx")
    fxadapt.export_onnx(variant(name, kind), (load(name)[1],), path)
    return path


def session(path: str):
    """An onnxruntime CPU session with one intra-op and one inter-op thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def runner(name: str, kind: str):
    """A no-argument callable running one batch-1 inference of the variant in onnxruntime
    (``fxadapt.hw.Target().compile``: BN folded, TorchScript ONNX exporter; ``onnx_path`` is the checked
    ``export_onnx`` route)."""
    from fxadapt.hw.target import Target

    return Target().compile(variant(name, kind), (load(name)[1],))


def median_latency(fns: dict, runs: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function; warm-up first, then interleaved timed rounds (thread CPU
    time, ``fxadapt.hw.Target().clock``)."""
    from fxadapt.hw.target import Target, interleaved

    return interleaved(fns, runs, warmup, clock=Target().clock)


def tp_macs_at(lat: float, pts: list[tuple[float, float]]) -> float:
    """MACs of TP at latency ``lat`` by linear interpolation (extrapolation at the ends) between measured
    ``(latency, macs)`` points.

    >>> tp_macs_at(1.5, [(1.0, 10.0), (2.0, 20.0), (3.0, 40.0)])
    15.0
    """
    pts = sorted(pts)
    i = min(max(int(np.searchsorted([p[0] for p in pts], lat)), 1), len(pts) - 1)
    (l0, m0), (l1, m1) = pts[i - 1], pts[i]
    return m0 + (m1 - m0) * (lat - l0) / (l1 - l0) if l1 != l0 else m0


def aligned(model: torch.nn.Module, block: int = ALIGN) -> float:
    """Share of conv output widths divisible by ``block`` (onnxruntime's NCHWc convolutions need it)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return sum(m.out_channels % block == 0 for m in convs) / max(len(convs), 1)


def measure(name: str, runs: int, warmup: int) -> dict[str, dict[str, float]]:
    """MACs, conv width alignment and median latency of every variant of ``name``."""
    x = load(name)[1]
    macs = {k: count_macs(variant(name, k), (x,)) for k in VARIANTS}
    lat = median_latency({k: runner(name, k) for k in VARIANTS}, runs, warmup)
    out = {k: {"macs": macs[k], "latency": lat[k], "aligned": aligned(variant(name, k))} for k in VARIANTS}
    pts = [(lat[k], macs[k]) for k in ("original", "tp-r16", "tp-r16+")]
    out["fxadapt"]["tp_macs_at_latency"] = tp_macs_at(lat["fxadapt"], pts)
    return out


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """The latency table.

    >>> r = {"m": {"original": {"macs": 2e9, "latency": 0.02, "aligned": 1.0},
    ...            "tp": {"macs": 1e9, "latency": 0.015, "aligned": 0.25}}}
    >>> print(format_table(r))  # doctest: +NORMALIZE_WHITESPACE
    model  variant   GMACs  MACs ratio  latency ms  latency ratio  latency ratio / MACs ratio  convs %16  TP-r16 MACs ratio at equal latency
    -----  --------  -----  ----------  ----------  -------------  --------------------------  ---------  ----------------------------------
    m      original  2.000       1.000      20.000          1.000                       1.000       100%
    m      tp        1.000       0.500      15.000          0.750                       1.500        25%
    """  # noqa: E501 - the table as printed
    from fxadapt.export.report import table

    rows = []
    for name, r in results.items():
        base = r["original"]
        for k, v in r.items():
            mr, lr = v["macs"] / base["macs"], v["latency"] / base["latency"]
            eq = v.get("tp_macs_at_latency")
            rows.append([name, k, f"{v['macs'] / 1e9:.3f}", f"{mr:.3f}", f"{1e3 * v['latency']:.3f}",
                         f"{lr:.3f}", f"{lr / mr:.3f}", f"{100 * v['aligned']:.0f}%",
                         f"{eq / base['macs']:.3f}" if eq else ""])
    return table(["model", "variant", "GMACs", "MACs ratio", "latency ms", "latency ratio",
                  "latency ratio / MACs ratio", f"convs %{ALIGN}", "TP-r16 MACs ratio at equal latency"],
                  rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--runs", type=int, default=50, help="timed runs per variant (median; default 50)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads while building (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = measure(name, args.runs, args.warmup)
        print(f"{name}: built, exported and timed in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__} CPU, 1 intra-op thread, batch 1, input {INPUT_SHAPE}, budget "
          f"{BUDGET}, median of {args.runs} runs after {args.warmup} warm-up runs\n")
    print(format_table(results))
    return 0


# ---- pytest-benchmark entry points (run: pytest bench/bench_latency.py --benchmark-enable) -------------

try:
    import pytest
except ImportError:  # plain-script use without pytest installed
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("kind", VARIANTS)
    @pytest.mark.parametrize("name", list(MODELS))
    def test_latency(benchmark, name, kind):
        pytest.importorskip("pytorchcv")
        run = runner(name, kind)
        benchmark.group = name
        benchmark.extra_info["macs"] = count_macs(variant(name, kind), (load(name)[1],))
        out = benchmark.pedantic(run, rounds=30, warmup_rounds=5)
        assert out[0].shape == (1, 1000)


if __name__ == "__main__":
    sys.exit(main())
