"""``fxadapt adapt``: adapt a model to a budget, print the report, save it, export ONNX, plot widths.

Usage::

    fxadapt adapt --example                       # bundled model, budget 0.5, outputs in fxadapt-example/
    fxadapt adapt pkg.module:factory --budget 0.5 --input-shape 1,3,224,224 -o adapted.pt \\
        [--onnx adapted.onnx] [--plot widths.png] [--no-fold-bn]

The saved ``.pt`` holds the whole module (``torch.load(path, weights_only=False)``); the ONNX file is
simplified and checked against onnxruntime. A progress bar shows the pipeline steps.

Example:
    >>> import tempfile, os
    >>> from fxadapt.cli import main
    >>> d = tempfile.mkdtemp()
    >>> main(["adapt", "--example", "--out-dir", d, "--quiet"])
    0
    >>> sorted(os.listdir(d))
    ['adapted.onnx', 'adapted.pt', 'widths.png']
"""

from __future__ import annotations

import argparse
import os

import torch

import fxadapt
from fxadapt.cli.common import CliError, add_model_arguments, load_model
from fxadapt.export.plot import plot_widths
from fxadapt.pipeline.transform import TransformConfig

STEPS = ("capture + analyze", "solve widths", "materialize", "verify", "fold BatchNorm", "count MACs")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("adapt", help="adapt a model to a MAC budget (shrink or grow), export ONNX",
                       description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--budget", default="0.5", help="fraction of the original MACs (0.5, 1.5), '50%%', or MACs "
                                                   "like '300M' (default 0.5)")
    p.add_argument("-o", "--output", help="where to save the adapted module (.pt)")
    p.add_argument("--onnx", help="also export ONNX here (simplified, checked with onnxruntime)")
    p.add_argument("--plot", help="write a PNG of per-group widths, original vs adapted")
    p.add_argument("--out-dir", help="directory for default output names (with --example: fxadapt-example)")
    p.add_argument("--no-fold-bn", action="store_true", help="keep BatchNorm layers (for fine-tuning)")
    p.add_argument("--grow-depth", action="store_true",
                   help="when growing, also add one zero-initialised copy of every repeatable block")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report on stdout")
    p.set_defaults(run=run)
    return p


def _budget(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _paths(args) -> tuple[str | None, str | None, str | None]:
    out_dir = args.out_dir or ("fxadapt-example" if args.example else None)
    def pick(value, name):
        return value or (os.path.join(out_dir, name) if out_dir else None)
    paths = pick(args.output, "adapted.pt"), pick(args.onnx, "adapted.onnx"), pick(args.plot, "widths.png")
    for p in paths:
        if p and os.path.dirname(p):
            os.makedirs(os.path.dirname(p), exist_ok=True)
    return paths


def run(args: argparse.Namespace) -> int:
    model, inputs, label = load_model(args)
    out_pt, out_onnx, out_png = _paths(args)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(STEPS) - args.no_fold_bn, desc=f"adapt {label}", unit="step", leave=True)
    def progress(name: str) -> None:
        if bar is not None:
            bar.set_postfix_str(name)
            bar.update(1)
    cfg = TransformConfig(fold_bn=not args.no_fold_bn, grow_depth=args.grow_depth, progress=progress)
    try:
        adapted = fxadapt.transform(model, _budget(args.budget), inputs, config=cfg)
    finally:
        if bar is not None:
            bar.close()
    rep = fxadapt.report(adapted)
    if not args.quiet:
        print(rep.table())
    if out_pt:
        torch.save(adapted, out_pt)
        _say(args, f"saved {out_pt}")
    if out_onnx:
        res = fxadapt.export_onnx(adapted, inputs, out_onnx)
        _say(args, f"ONNX {res.path}: {res.nodes} nodes, simplified, onnxruntime max |diff| {res.max_abs_diff:.2e}")
    if out_png:
        plot_widths(rep, out_png)
        _say(args, f"plot {out_png}")
    if not (out_pt or out_onnx or out_png) and args.quiet:
        raise CliError("nothing to write: give -o, --onnx, --plot or --out-dir (or drop --quiet)")
    return 0


def _say(args, text: str) -> None:
    if not args.quiet:
        print(text)
