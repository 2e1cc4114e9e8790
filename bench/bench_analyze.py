"""Benchmark: fxadapt capture and analysis time next to Torch-Pruning's dependency-graph build.

For each zoo model (pytorchcv, 1x3x224x224) three things are timed in the same process:

- ``capture``:  ``fxadapt.capture(model, (x,))`` (torch.export + module lifting);
- ``analyze``:  ``fxadapt.analyze(gm)`` on the captured ``GraphModule`` (capture skipped);
- ``tp_build``: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=x)``.

Two ways to run it:

- as a script, printing a comparison table (medians after one warm-up)::

      python bench/bench_analyze.py [--repeats 7] [--capture-repeats 3] [--models resnet50,densenet121]

- as pytest-benchmark tests (grouped per model; pyproject disables benchmarks by default)::

      pytest bench/bench_analyze.py --benchmark-enable

Target (issue): ``analyze`` after capture takes at most TP's build time on resnet50.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import sys
import time
from collections.abc import Callable

import torch

import fxadapt

MODELS: dict[str, tuple[str, str]] = {
    "resnet50": ("pytorchcv.models.resnet", "resnet50"),
    "mobilenetv3_large_w1": ("pytorchcv.models.mobilenetv3", "mobilenetv3_large_w1"),
    "efficientnet_b0": ("pytorchcv.models.efficientnet", "efficientnet_b0"),
    "densenet121": ("pytorchcv.models.densenet", "densenet121"),
}
INPUT_SHAPE = (1, 3, 224, 224)


@functools.cache
def load(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The zoo model ``name`` (eval mode, random weights) and a fixed example input.

    >>> model, x = load("resnet50")
    >>> tuple(x.shape)
    (1, 3, 224, 224)
    """
    module, factory = MODELS[name]
    torch.manual_seed(0)
    model = getattr(importlib.import_module(module), factory)().eval()
    return model, torch.randn(*INPUT_SHAPE)


@functools.cache
def captured(name: str) -> torch.fx.GraphModule:
    """The captured ``GraphModule`` of zoo model ``name`` (cached: analysis timings reuse it)."""
    model, x = load(name)
    return fxadapt.capture(model, (x,))


def tp_build(model: torch.nn.Module, x: torch.Tensor):
    """Torch-Pruning's dependency-graph build, the baseline."""
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=x)


def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time (seconds, ``time.perf_counter``) of each function over ``repeats`` runs.

    Every function is warmed up ``warmup`` times first; the timed runs are interleaved (one round runs each
    function once), so background load on the machine hits every contender alike.

    >>> t = median_times({"a": lambda: sum(range(10)), "b": lambda: None}, repeats=3)
    >>> sorted(t), t["a"] < 1.0
    (['a', 'b'], True)
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def measure(name: str, repeats: int = 7, capture_repeats: int = 3) -> dict[str, float]:
    """Median capture / analysis / TP-build seconds for zoo model ``name`` (timed in the same process).

    Analysis and TP's build are interleaved, so they see the same machine load.
    """
    model, x = load(name)
    gm = captured(name)
    out = median_times({"capture": lambda: fxadapt.capture(model, (x,))}, capture_repeats)
    out.update(median_times({"analyze": lambda: fxadapt.analyze(gm),
                             "tp_build": lambda: tp_build(model, x)}, repeats))
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The comparison table (seconds and ratios to TP's build).

    >>> print(format_table({"m": {"capture": 2.0, "analyze": 0.1, "tp_build": 0.2}}))
    model  capture s  analyze s  TP build s  analyze / TP  (capture+analyze) / TP
    -----  ---------  ---------  ----------  ------------  ----------------------
    m          2.000      0.100       0.200          0.50                   10.50
    """
    from fxadapt.export.report import table

    rows = []
    for name, r in results.items():
        rows.append([name, f"{r['capture']:.3f}", f"{r['analyze']:.3f}", f"{r['tp_build']:.3f}",
                     f"{r['analyze'] / r['tp_build']:.2f}",
                     f"{(r['capture'] + r['analyze']) / r['tp_build']:.2f}"])
    return table(["model", "capture s", "analyze s", "TP build s", "analyze / TP",
                  "(capture+analyze) / TP"], rows)


def main(argv: list[str] | None = None) -> int:
    """Measure the selected models and print the comparison table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7, help="timed analysis / TP runs (median; default 7)")
    p.add_argument("--capture-repeats", type=int, default=3, help="timed capture runs (median; default 3)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s): {', '.join(unknown)}")
    results = {}
    for name in names:
        results[name] = measure(name, args.repeats, args.capture_repeats)
        r = results[name]
        print(f"{name}: capture {r['capture']:.3f} s, analyze {r['analyze']:.3f} s, "
              f"TP build {r['tp_build']:.3f} s", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {INPUT_SHAPE}, "
          f"median of {args.repeats} runs ({args.capture_repeats} for capture) after 1 warm-up\n")
    print(format_table(results))
    return 0


# ---- pytest-benchmark entry points (run: pytest bench/bench_analyze.py --benchmark-enable) -------------

try:
    import pytest
except ImportError:  # plain-script use without pytest installed
    pytest = None

if pytest is not None:
    _names = pytest.mark.parametrize("name", list(MODELS))

    @_names
    def test_capture(benchmark, name):
        model, x = load(name)
        benchmark.group = name
        gm = benchmark.pedantic(fxadapt.capture, args=(model, (x,)), rounds=3, warmup_rounds=1)
        assert isinstance(gm, torch.fx.GraphModule)

    @_names
    def test_analyze(benchmark, name):
        gm = captured(name)
        benchmark.group = name
        a = benchmark.pedantic(fxadapt.analyze, args=(gm,), rounds=5, warmup_rounds=1)
        assert a.groups

    @_names
    def test_tp_build(benchmark, name):
        model, x = load(name)
        benchmark.group = name
        benchmark.pedantic(tp_build, args=(model, x), rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
