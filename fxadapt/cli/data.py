"""Data options of ``fxadapt adapt``: search on the user's data, also under ``torchrun``.

``--data pkg.module:function`` (or ``path/to/file.py:function``) names a function called with no arguments
that returns ``(train, val)``: each a ``(inputs, targets)`` tuple of tensors, a ``Dataset`` or a
``DataLoader`` (``val`` may be ``None``: the search then validates on ``train``). With ``--data`` the
default strategy is ``importance``; ``--strategy``, ``--steps``, ``--device`` and ``--precision`` tune the
search (``--steps`` is ``ImportanceConfig.steps``, or ``SearchConfig.steps`` with ``--strategy dna``;
``--device`` / ``--precision`` are ``TransformConfig.device`` / ``.precision``)::

    fxadapt adapt my_model.py:build --input-shape 1,3,224,224 --budget 0.5 --data my_data.py:load
    torchrun --nproc_per_node=4 -m fxadapt adapt my_model.py:build --input-shape 1,3,224,224 \\
        --budget 0.5 --data my_data.py:load --device cuda

Under ``torchrun`` every rank loads the data (the search shards it, see ``fxadapt.dist``); only rank 0
should print and write files (``fxadapt.dist.is_main``).

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_data_arguments(p)
    >>> args = p.parse_args(["--data", "fxadapt.cli.data:demo_data", "--steps", "5"])
    >>> train, val, options = load_data(args)
    >>> train[0].shape, options["strategy"], options["importance"].steps, options["device"]
    (torch.Size([64, 3, 32, 32]), 'importance', 5, 'cpu')
    >>> load_data(p.parse_args([]))
    (None, None, {})
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from fxadapt.cli.common import CliError, first_line, import_user_module, split_spec
from fxadapt.search.dna import SearchConfig
from fxadapt.search.fur import FurConfig
from fxadapt.search.importance import ImportanceConfig


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--strategy``, ``--steps``, ``--device``, ``--precision`` (see the module docstring)."""
    parser.add_argument("--data", metavar="MODULE:FUNCTION",
                        help="function returning (train, val) datasets, tensors or DataLoaders: searches "
                             "widths/depths on them (works under torchrun)")
    parser.add_argument("--strategy", choices=["auto", "datafree", "dna", "fur", "importance"],
                        default="auto", help="auto: importance with --data, else datafree")
    parser.add_argument("--steps", type=int, help="the search's weight steps (importance: its distillation "
                                                   "steps; dna: its search steps, default 300)")
    parser.add_argument("--device", default="cpu", help="where the search runs: cpu or cuda (cuda:LOCAL_RANK "
                                                        "under torchrun)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="search precision: auto = bf16 autocast on CUDA, fp32 on CPU")


def load_data(args: argparse.Namespace) -> tuple[Any, Any, dict]:
    """``(train, val, transform options)`` from the options of ``add_data_arguments``."""
    if not getattr(args, "data", None):
        if getattr(args, "strategy", "auto") in ("dna", "fur", "importance"):
            raise CliError(f"--strategy {args.strategy} searches on data: give --data MODULE:FUNCTION")
        return None, None, {}
    where, name = split_spec(args.data)
    fn = import_user_module(where)
    for attr in name.split("."):
        if not hasattr(fn, attr):
            raise CliError(f"{where!r} has no attribute {name!r}")
        fn = getattr(fn, attr)
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the user's data function failed
        raise CliError(f"data function {args.data!r} raised {type(e).__name__}: {first_line(e)}") from e
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise CliError(f"data function {args.data!r} must return (train, val), got {type(out).__name__}")
    return out[0], out[1], _options(args)


def _options(args: argparse.Namespace) -> dict:
    """The ``transform`` options of the flags: each flag has one place (``--steps``: ``SearchConfig.steps``;
    ``--device``, ``--precision``: ``TransformConfig``)."""
    strategy = "importance" if args.strategy == "auto" else args.strategy
    if strategy == "fur" and args.steps is not None:
        raise CliError("--steps sets the importance or DNA search's steps; --strategy fur runs FurConfig's "
                       "iterations and train_steps: leave --steps out")
    show = not getattr(args, "quiet", False)
    steps = {} if args.steps is None else {"steps": args.steps}
    if strategy == "importance":   # --steps: its distillation steps (ImportanceConfig.steps)
        return {"strategy": strategy, "device": args.device, "precision": args.precision,
                "importance": ImportanceConfig(**steps)}
    return {"strategy": strategy, "device": args.device, "precision": args.precision,
            "search": SearchConfig(progress=show, **steps), "fur": FurConfig(progress=show)}


def demo_data(n: int = 64, seed: int = 0):
    """Random 3x32x32 images with 10 classes, as ``(train, val)``: for trying ``--data`` on ``--example``."""
    g = torch.Generator().manual_seed(seed)
    make = lambda k: (torch.randn(k, 3, 32, 32, generator=g), torch.randint(0, 10, (k,), generator=g))
    return make(n), make(n // 2)
