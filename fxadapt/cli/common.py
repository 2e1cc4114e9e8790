"""Shared pieces of the ``fxadapt`` command line: model loading, input shapes, the error every subcommand
raises.

A subcommand that works on a model calls ``add_model_arguments(parser)`` when it builds its parser and
``load_model(args)`` when it runs; both ``inspect`` and a later ``adapt`` accept the same model options:

- ``MODEL``: ``pkg.module:factory`` or ``path/to/file.py:factory``; the factory is called with no arguments
  and must return an ``nn.Module``;
- ``--example``: the bundled example model (``fxadapt.examples``) instead of a factory;
- ``--input-shape SHAPE[:DTYPE[:LOW-HIGH]]`` (repeat it for a model with several inputs): a random
  example input. ``1,3,224,224`` is float32 from ``torch.randn``; ``1,128:int64:0-30522`` is int64 token
  ids drawn uniformly from ``[0, 30522)`` (``torch.randint``, high exclusive: a vocabulary size fits);
  ``1,3,32,32:float16:0-1`` is uniform in ``[0, 1)``; ``1,16:bool`` is random True/False. DTYPE is any
  ``torch`` dtype name (``float32``, ``float16``, ``bfloat16``, ``float64``, ``int64``, ``int32``,
  ``int16``, ``int8``, ``uint8``, ``bool``); integer dtypes need a range. ``--seed`` fixes the values.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxadapt.cli import hf
from fxadapt.cli.usage import CliError  # noqa: F401  (re-export: raised by every subcommand)
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model


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
        raise CliError(f"bad input shape {text!r}: expected positive integers separated by commas, e.g. "
                       "1,3,224,224")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True)
class InputSpec:
    """One random example input: shape, dtype and (optionally) the value range ``[low, high)``."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    low: float | None = None
    high: float | None = None

    def make(self, gen: torch.Generator) -> torch.Tensor:
        """A random tensor of this spec (``randn`` for floats without a range, else uniform / ``randint``)."""
        if self.dtype == torch.bool:
            return torch.randint(0, 2, self.shape, generator=gen).bool()
        if self.dtype.is_floating_point:
            x = torch.randn(*self.shape, generator=gen) if self.low is None else \
                torch.rand(*self.shape, generator=gen) * (self.high - self.low) + self.low
            return x.to(self.dtype)
        return torch.randint(int(self.low), int(self.high), self.shape, generator=gen, dtype=self.dtype)

    def __str__(self) -> str:
        text = "x".join(str(d) for d in self.shape)
        if self.dtype != torch.float32 or self.low is not None:
            text += f":{str(self.dtype).removeprefix('torch.')}"
        return text + (f":{self.low:g}-{self.high:g}" if self.low is not None else "")


_NUMBER = r"-?[0-9]+(?:\.[0-9]*)?"


def parse_input(text: str) -> InputSpec:
    """``"SHAPE[:DTYPE[:LOW-HIGH]]"`` -> ``InputSpec`` (see the module docstring).

    >>> (str(parse_input("1,128:int64:0-30522")), str(parse_input("1x3x8x8")),
    ...  str(parse_input("2,4:float16:-1-1")))
    ('1x128:int64:0-30522', '1x3x8x8', '2x4:float16:-1-1')
    >>> try:
    ...     parse_input("1,128:int64")
    ... except CliError as e:
    ...     print(e)
    bad input '1,128:int64': an integer input needs a value range, e.g. 1,128:int64:0-30522 (token ids below
    30522)
    """
    shape_text, _, rest = text.partition(":")
    dtype_text, _, range_text = rest.partition(":")
    shape = parse_shape(shape_text)
    dtype = getattr(torch, dtype_text.strip() or "float32", None)
    if not isinstance(dtype, torch.dtype) or dtype.is_complex:
        raise CliError(f"bad input {text!r}: unknown dtype {dtype_text!r}; use float32, float16, bfloat16, "
                       f"float64, int64, int32, int16, int8, uint8 or bool, e.g. 1,128:int64:0-30522")
    low = high = None
    if range_text.strip():
        m = re.fullmatch(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*", range_text)
        if not m or float(m.group(1)) >= float(m.group(2)):
            raise CliError(f"bad input {text!r}: the range must be LOW-HIGH with LOW < HIGH, e.g. 0-30522")
        low, high = float(m.group(1)), float(m.group(2))
    elif not dtype.is_floating_point and dtype != torch.bool:
        raise CliError(f"bad input {text!r}: an integer input needs a value range, e.g. "
                       f"{shape_text}:{dtype_text}:0-30522 (token ids below 30522)")
    return InputSpec(shape, dtype, low, high)


def import_user_module(where: str) -> Any:
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
        assert spec is not None and spec.loader is not None, path   # a .py file always has a spec and loader
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
        raise CliError(f"cannot import {where!r}: {type(e).__name__}: {first_line(e)}") from e


def split_spec(spec: str) -> tuple[str, str]:
    """``"pkg.module:factory"`` -> ``("pkg.module", "factory")``, or a ``CliError`` saying what is expected.

    >>> split_spec("models/net.py:build")
    ('models/net.py', 'build')
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name or not all(p.isidentifier() for p in name.split(".")):
        raise CliError(f"bad model spec {spec!r}: expected MODULE:FACTORY or FILE.py:FACTORY, "
                       f"e.g. pytorchcv.models.resnet:resnet50")
    return where, name


def load_factory(spec: str) -> nn.Module:
    """Call the factory named by ``spec`` (``pkg.module:factory`` or ``file.py:factory``) and check the
    result.

    >>> type(load_factory("fxadapt.examples:example_model")).__name__
    'ExampleResNet'
    """
    where, name = split_spec(spec)
    obj = import_user_module(where)
    for attr in name.split("."):
        if not hasattr(obj, attr):
            raise CliError(f"{where!r} has no attribute {name!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise CliError(f"{spec!r} is not callable (expected a factory function or class)")
    try:
        model = obj()
    except Exception as e:  # noqa: BLE001 - the user's factory failed
        raise CliError(f"factory {spec!r} raised {type(e).__name__}: {first_line(e)}") from e
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
    parser.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE[:LOW-HIGH]]", default=None,
                        help="a random example input: 1,3,224,224 (float32, randn) or 1,128:int64:0-30522 "
                             "(int64 token ids in [0, 30522)); repeat for several inputs; default with "
                             "--example: 1,3,32,32")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random example inputs (default 0)")


def load_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    """The model, its example inputs and a label for reports, from the options of ``add_model_arguments``."""
    if args.example and args.model:
        raise CliError("give either MODEL or --example, not both")
    if not args.example and not args.model:
        raise CliError("no model: give MODEL (pkg.module:factory, file.py:factory or a save_pretrained "
                       "directory) or --example")
    if hf.is_checkpoint(args.model):   # a local Hugging Face checkpoint: inputs from its config
        specs = [parse_input(s) for s in args.input_shape or ()]
        gen = torch.Generator().manual_seed(args.seed)
        model, inputs = hf.load_dir(args.model, [s.make(gen) for s in specs])
        return model, inputs, os.path.basename(os.path.normpath(args.model))
    if args.model:
        split_spec(args.model)
    specs = input_specs(args)  # malformed specs and inputs fail before the factory runs
    if args.example:
        model, label = example_model(), "example"
    else:
        model, label = load_factory(args.model), args.model
    gen = torch.Generator().manual_seed(args.seed)
    return model, tuple(s.make(gen) for s in specs), label


def input_specs(args: argparse.Namespace) -> list[InputSpec]:
    """The parsed ``--input-shape`` options (the example's shape by default with ``--example``).

    >>> input_specs(argparse.Namespace(example=False, input_shape=["1,8:int32:0-5"]))
    [InputSpec(shape=(1, 8), dtype=torch.int32, low=0.0, high=5.0)]
    """
    if args.input_shape:
        return [parse_input(s) for s in args.input_shape]
    if args.example:
        return [InputSpec(tuple(EXAMPLE_INPUT_SHAPE))]
    raise CliError("--input-shape is required with MODEL, e.g. --input-shape 1,3,224,224 "
                   "(or 1,128:int64:0-30522 for token ids)")


def describe_inputs(inputs: tuple[torch.Tensor, ...] | dict) -> str:
    """``"1x3x32x32"``, with the dtype when it is not float32 (``"1x128:int64"``); keyword inputs by name.

    >>> describe_inputs((torch.zeros(1, 3, 8, 8), torch.zeros(2, 5, dtype=torch.long)))
    '1x3x8x8, 2x5:int64'
    """
    if isinstance(inputs, dict):
        return ", ".join(f"{k}={describe_inputs((v,))}" for k, v in inputs.items())
    return ", ".join("x".join(str(d) for d in x.shape)
                     + ("" if x.dtype == torch.float32 else f":{str(x.dtype).removeprefix('torch.')}")
                     for x in inputs)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def one_line(e: BaseException) -> str:
    """An error message folded onto one line.

    >>> one_line(ValueError("cannot capture M: boom\\n  at m.py:3 in forward: x.item()"))
    'cannot capture M: boom; at m.py:3 in forward: x.item()'
    """
    return "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__
