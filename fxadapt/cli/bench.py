"""``fxadapt bench``: adapt a model to several budgets, measure every result on several targets.

Usage::

    fxadapt bench --example --budgets 0.75,latency=0.7 --targets onnxruntime-cpu,torch-cpu
    fxadapt bench pkg.module:factory --input-shape 1,3,224,224 --budgets 0.5,0.75,latency=0.5 \\
        [--json bench.json] [--plot pareto.png] [--runs 20]
    fxadapt bench --example --budgets 0.25,0.5,0.75 --data fxadapt.cli.data:demo_data --steps 50 \\
        --finetune-epochs 2

With ``--data MODULE:FUNCTION`` (as ``fxadapt adapt --data``) the MAC budgets are also adapted by one search
for all of them, beside the data-free models; every row gets its top-1 accuracy on the validation data and
the plot adds accuracy against latency (``fxadapt.export.bench.BenchData``).

``--budgets`` is a comma-separated list; each item is a MAC budget as ``fxadapt adapt --budget`` takes it
(``0.5``, ``50%``, ``300M``) or ``latency=X`` with ``X`` a fraction of the original's latency on the first
target or a duration (``latency=3.2ms``). ``--targets`` lists ``RUNTIME-DEVICE`` pairs among
``onnxruntime-cpu``, ``torch-cpu``, ``onnxruntime-cuda``, ``torch-cuda`` (default: onnxruntime and torch on
CPU, plus torch CUDA when a GPU is present); ``--threads`` applies to all. Prints the table (budget, MACs,
params, latency and latency ratio per target), and writes JSON and a latency-vs-MACs Pareto PNG
(defaults ``<label>-bench.json`` / ``<label>-bench.png`` in the current directory). See
``fxadapt.export.bench.benchmark``.

Example:
    >>> from fxadapt.cli.bench import parse_budgets, parse_targets
    >>> parse_budgets("0.5,latency=0.7,latency=3ms")
    [0.5, Budget(macs=None, params=None, latency=0.7, target=None, macs_abs=None, params_abs=None),
    Budget(macs=None, params=None, latency='3ms', target=None, macs_abs=None, params_abs=None)]
    >>> [t.name() for t in parse_targets("onnxruntime-cpu,torch-cpu", 1)]
    ['onnxruntime-cpu-1t', 'torch-cpu-1t']
"""

from __future__ import annotations

import argparse
import re

from fxadapt.cli.adapt import check_budget
from fxadapt.cli.common import CliError, add_model_arguments, load_model
from fxadapt.cli.data import add_data_arguments, load_data
from fxadapt.export.bench import BenchData, benchmark, default_targets
from fxadapt.hw.target import Target
from fxadapt.planning.budget import Budget


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the subparsers object of the top-level parser."""
    p = sub.add_parser("bench",
                       help="adapt to several budgets and measure latency, MACs and params per target",
                       description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--budgets", default="0.5,0.75", help="comma-separated budgets: MAC fractions (0.5), "
                   "'300M', or latency=0.5 / latency=3.2ms (default 0.5,0.75)")
    p.add_argument("--targets", default=None,
                   help="comma-separated RUNTIME-DEVICE: onnxruntime-cpu, torch-cpu, "
                   "onnxruntime-cuda, torch-cuda (default: both CPU runtimes, + torch-cuda with a GPU)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every target (default 1)")
    p.add_argument("--runs", type=int, default=20,
                   help="timed runs per model and target (median; default 20)")
    p.add_argument("--json", help="write the results as JSON here (default <label>-bench.json)")
    p.add_argument("--plot", help="write the latency-vs-MACs Pareto plot here (default <label>-bench.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_data_arguments(p)
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="with --data: fine-tune every adapted model this many epochs (the same for all)")
    p.set_defaults(run=run)
    return p


def parse_budgets(text: str) -> list:
    out: list[Budget | float | str] = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        if item.startswith("latency="):
            lat = item.partition("=")[2]
            out.append(Budget(latency=float(lat) if re.fullmatch(r"[0-9.]+", lat) else lat))
        else:
            out.append(check_budget(item))
    if not out:
        raise CliError("--budgets is empty")
    return out


def parse_targets(text: str | None, threads: int) -> list:
    if not text:
        return [Target(t.runtime, t.device, threads) for t in default_targets()]
    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        runtime, _, device = item.partition("-")
        out.append(Target(runtime, device or "cpu", threads))
    return out


def run(args: argparse.Namespace) -> int:
    budgets = parse_budgets(args.budgets)
    targets = parse_targets(args.targets, args.threads)
    model, inputs, label = load_model(args)
    train, val, options = load_data(args)
    data = BenchData(train, val, options, args.finetune_epochs) if train is not None else None
    res = benchmark(model, inputs, budgets, targets, runs=args.runs, progress=not args.quiet, data=data)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label.split(":")[-1])
    print(res.table())
    print(f"wrote {res.to_json(args.json or f'{stem}-bench.json')}")
    print(f"wrote {res.plot(args.plot or f'{stem}-bench.png')}")
    return 0
