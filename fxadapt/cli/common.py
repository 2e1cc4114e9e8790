"""Shared pieces of the ``fxadapt`` command line: model loading, input shapes, the error every subcommand raises.

A subcommand that works on a model calls ``add_model_arguments(parser)`` when it builds its parser and
``load_model(args)`` when it runs; both ``inspect`` and a later ``adapt`` accept the same model options:

- ``MODEL``: ``pkg.module:factory`` or ``path/to/file.py:factory``; the factory is called with no arguments
  and must return an ``nn.Module``;
- ``--example``: the bundled example model (``fxadapt.examples``) instead of a factory;
- ``--input-shape 1,3,224,224`` (repeat it for a model with several inputs).

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_model_arguments(p)
    >>> model, inputs, label = load_model(p.parse_args(["--example"]))
    >>> label, [tuple(x.shape) for x in inputs]
    ('example', [(1, 3, 32, 32)])
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CliError(Exception):
    """A usage problem the command line reports in one line (exit status 2), without a traceback."""


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``"1x3x224x224"``) -> ``(1, 3, 224, 224)``.

    >>> parse_shape("1, 3, 32,32")
    (1, 3, 32, 32)
    >>> try:
    ...     parse_shape("1,3,a")
    ... except CliError as e:
    ...     print(e)
    bad input shape '1,3,a': expected positive integers separated by commas, e.g. 1,3,224,224
    """
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    if not text.strip() or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise CliError(f"bad input shape {text!r}: expected positive integers separated by commas, e.g. 1,3,224,224")
    return tuple(int(p) for p in parts)


def _import_module(where: str) -> Any:
    """Import ``pkg.module`` (the current directory is importable) or load ``path/to/file.py``."""
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    try:
        if not is_file:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            return importlib.import_module(where)
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise CliError(f"cannot import {where!r}: no such file")
        spec = importlib.util.spec_from_file_location(f"fxadapt_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # the file may import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.parent))
        return module
    except CliError:
        raise
    except BaseException as e:  # noqa: BLE001 - any import-time failure (SystemExit included) is the user's
        raise CliError(f"cannot import {where!r}: {type(e).__name__}: {_first_line(e)}") from e


def load_factory(spec: str) -> nn.Module:
    """Call the factory named by ``spec`` (``pkg.module:factory`` or ``file.py:factory``) and check the result.

    >>> type(load_factory("fxadapt.examples:example_model")).__name__
    'ExampleResNet'
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name or not all(p.isidentifier() for p in name.split(".")):
        raise CliError(f"bad model spec {spec!r}: expected MODULE:FACTORY or FILE.py:FACTORY, "
                       f"e.g. pytorchcv.models.resnet:resnet50")
    obj = _import_module(where)
    for attr in name.split("."):
        if not hasattr(obj, attr):
            raise CliError(f"{where!r} has no attribute {name!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise CliError(f"{spec!r} is not callable (expected a factory function or class)")
    try:
        model = obj()
    except Exception as e:  # noqa: BLE001 - the user's factory failed
        raise CliError(f"factory {spec!r} raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise CliError(f"factory {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options every model-consuming subcommand takes (see the module docstring)."""
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="model factory: pkg.module:factory or path/to/file.py:factory (called with no "
                             "arguments, returns an nn.Module)")
    parser.add_argument("--example", action="store_true",
                        help="use the bundled example model (a small CIFAR-style ResNet) instead of MODEL")
    parser.add_argument("--input-shape", action="append", metavar="SHAPE", default=None,
                        help="shape of a random example input, e.g. 1,3,224,224 (repeat for several inputs; "
                             "default with --example: 1,3,32,32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random example inputs (default 0)")


def load_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """The model, its example inputs and a label for reports, from the options of ``add_model_arguments``."""
    if args.example and args.model:
        raise CliError("give either MODEL or --example, not both")
    if not args.example and not args.model:
        raise CliError("no model: give MODEL (pkg.module:factory or file.py:factory) or --example")
    if args.example:
        from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model

        model, label, default = example_model(), "example", [EXAMPLE_INPUT_SHAPE]
    else:
        model, label, default = load_factory(args.model), args.model, None
    if args.input_shape:
        shapes = [parse_shape(s) for s in args.input_shape]
    elif default is not None:
        shapes = default
    else:
        raise CliError("--input-shape is required with MODEL, e.g. --input-shape 1,3,224,224")
    gen = torch.Generator().manual_seed(args.seed)
    return model, tuple(torch.randn(*s, generator=gen) for s in shapes), label


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def one_line(e: BaseException) -> str:
    """An error message folded onto one line.

    >>> one_line(ValueError("cannot capture M: boom\\n  at m.py:3 in forward: x.item()"))
    'cannot capture M: boom; at m.py:3 in forward: x.item()'
    """
    return "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__
