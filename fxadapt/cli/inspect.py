"""``fxadapt inspect``: capture a model, analyse it and print its channel groups and residual blocks.

Usage::

    fxadapt inspect pkg.module:factory --input-shape 1,3,224,224 [--json out.json]
    fxadapt inspect path/to/file.py:factory --input-shape 1,3,32,32
    fxadapt inspect --example

Prints ``Analysis.summary()`` (groups: width, MACs elasticity, prunable or frozen with the reason;
blocks), then the totals and timings. ``--json FILE`` also writes the groups and blocks as JSON (``-``:
stdout, and then the table is not printed).

A group's MACs elasticity is ``n * dMACs/dn / MACs``: the % change of the model's MACs per 1% change of
the group's width. A group on both sides of an op (a depthwise conv's input and output, both operands of
a matmul) counts twice, so values can exceed 1 and do not sum to 1. The JSON carries it as
``macs_elasticity`` (and, for older readers, under its former name ``macs_share``).

Inputs are random: ``--input-shape 1,3,224,224`` is a float tensor; ``--input-shape 1,128:int64:0-30522``
is an int64 tensor of token ids drawn from ``[0, 30522)`` (see ``fxadapt.cli.common``).

Example:
    >>> import argparse
    >>> from fxadapt.cli import build_parser
    >>> args = build_parser().parse_args(["inspect", "--example", "--json", "-"])
    >>> run(args)  # doctest: +ELLIPSIS
    {
      "model": "example",
    ...
    0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

import fxadapt
from fxadapt.analysis.hold import module_names
from fxadapt.cli.common import CliError, add_model_arguments, describe_inputs, load_model
from fxadapt.export.report import human


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``inspect`` on the subparsers object of the top-level parser."""
    p = sub.add_parser("inspect", help="print a model's coupled channel groups and residual blocks",
                       description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--json", metavar="FILE",
                   help="also write groups and blocks as JSON to FILE ('-': stdout)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Capture, analyse, print; returns the exit status (errors raise ``CliError`` / ``FxAdaptError``)."""
    model, inputs, label = load_model(args)
    t0 = time.perf_counter()
    gm = fxadapt.capture(model, inputs)
    t1 = time.perf_counter()
    a = fxadapt.analyze(gm)
    t2 = time.perf_counter()
    timing = {"capture": round(t1 - t0, 4), "analysis": round(t2 - t1, 4)}
    if args.json != "-":
        print(f"model {label}  input {describe_inputs(inputs)}\n")
        print(a.summary())
        print()
        print(totals_line(a))
        print(names_line(a))
        print(f"time: capture {timing['capture']:.3f} s, analysis {timing['analysis']:.3f} s")
    if args.json:
        tensors = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        data = analysis_to_dict(a, label, [tuple(x.shape) for x in tensors], timing)
        data["input_dtypes"] = [str(x.dtype).removeprefix("torch.") for x in tensors]
        text = json.dumps(data, indent=2)
        if args.json == "-":
            print(text)
        else:
            _write(args.json, text)
            print(f"wrote {args.json}")
    return 0


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise CliError(f"cannot write {path!r}: {e.strerror or e}") from e


def names_line(a: fxadapt.Analysis) -> str:
    """The module names ``transform``'s ``keep=`` / ``only=`` / ``min_width=`` / ``max_width=`` take (or
    fnmatch patterns over them, ``fxadapt.analysis.hold``), in graph order.

    >>> import torch
    >>> print(names_line(fxadapt.analyze(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 2)),
    ...                                  (torch.randn(1, 2),))))
    modules (keep= / only= / min_width= / max_width= take these names or patterns such as '*.mlp.*'): 0, 1
    """
    return ("modules (keep= / only= / min_width= / max_width= take these names or patterns such as "
            "'*.mlp.*'): "
            + ", ".join(module_names(a)))


def totals_line(a: fxadapt.Analysis) -> str:
    """One line of totals: MACs, parameters, groups by state (frozen ones by reason), blocks.

    >>> import torch
    >>> from fxadapt.examples import example_model
    >>> print(totals_line(fxadapt.analyze(example_model(), (torch.randn(1, 3, 32, 32),))))
    totals: MACs 18,268,992 (18.269M)  params 43,778 (43.778K)  groups 8: 7 prunable, 1 frozen (output:
    reaches the model output: 1)  blocks 4: 3 removable, 3 repeatable
    """
    macs, params = a.macs(), a.params()
    reasons = Counter(g.reason for g in a.groups if not g.prunable)
    frozen = f", {sum(reasons.values())} frozen" + (
        " (" + "; ".join(f"{r}: {n}" for r, n in reasons.most_common()) + ")" if reasons else "")
    return (f"totals: MACs {macs:,.0f} ({human(macs)})  params {params:,.0f} ({human(params)})  "
            f"groups {len(a.groups)}: {len(a.prunable)} prunable{frozen}  "
            f"blocks {len(a.blocks)}: {sum(b.removable for b in a.blocks)} removable, "
            f"{sum(b.repeatable for b in a.blocks)} repeatable")


def analysis_to_dict(a: fxadapt.Analysis, label: str = "", input_shapes: list | None = None,
                     timing: dict | None = None) -> dict[str, Any]:
    """The analysis as plain JSON-ready data: totals, groups (with members) and blocks.

    >>> import torch
    >>> from fxadapt.examples import example_model
    >>> d = analysis_to_dict(fxadapt.analyze(example_model(), (torch.randn(1, 3, 32, 32),)))
    >>> sorted(d), sorted(d["groups"][0])
    (['blocks', 'groups', 'input_shapes', 'macs', 'model', 'params', 'timing_s'], ['granularity', 'id',
    'macs_elasticity', 'macs_share', 'members', 'name', 'params_share', 'prunable', 'reason', 'units',
    'width'])
    """
    groups = [{
        "id": g.id, "name": g.name, "width": g.width, "units": g.units, "granularity": g.granularity,
        "prunable": g.prunable, "reason": g.reason, "macs_elasticity": float(g.macs_share),
        "macs_share": float(g.macs_share),
        "params_share": float(g.params_share), "members": [_member(m) for m in g.members],
    } for g in a.groups]
    blocks = [{
        "id": b.id, "entry": b.entry, "exit": b.exit, "body": list(b.body), "removable": b.removable,
        "repeatable": b.repeatable, "reason": b.reason,
    } for b in a.blocks]
    return {"model": label, "input_shapes": [list(s) for s in input_shapes or []], "macs": float(a.macs()),
            "params": float(a.params()), "groups": groups, "blocks": blocks, "timing_s": timing or {}}


def _member(m) -> dict[str, Any]:
    site = m.site
    out = {"kind": site.kind, "role": site.role, "node": site.node_name, "target": m.target,
           "axis": int(site.axis), "positions": int((m.index >= 0).sum())}
    if site.kind == "shape_arg":
        out.update(arg=int(site.arg), index=int(site.index))
    return out


if __name__ == "__main__":  # pragma: no cover - convenience: python -m fxadapt.cli.inspect ...
    from fxadapt.cli import main

    sys.exit(main(["inspect", *sys.argv[1:]]))
