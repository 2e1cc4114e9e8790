"""How a node's own arguments change when the channels it indexes are sliced or grown (``OpSpec.edit``).

An edit gets the op, its schema-ordered arguments, the ``Site`` the channel rule recorded and the new
positions ``index`` of that site (source positions, in new order), plus the node's original output value,
and returns the (possibly different) op and new arguments:

- ``shape_arg``: entry ``site.index`` of the shape list at argument ``site.arg`` becomes ``len(index)``
  (view/reshape/expand sizes, unflatten sizes, a layer norm's ``normalized_shape``);
- ``groups``: argument ``site.arg`` (a depthwise conv's ``groups``) becomes ``len(index)``;
- split/chunk: becomes ``split_with_sizes`` with the number of kept positions of every piece;
- slice ``x[lo:hi]`` / ``narrow(x, dim, lo, hi - lo)``: the kept run's new start and end.

>>> import numpy as np, torch
>>> from fxadapt.ir.channels import Site
>>> site = Site("shape_arg", np.arange(8), "shape", "view", arg=1, index=1)
>>> set_shape_entry(torch.ops.aten.view.default, ["x", [1, 8, 4]], site, np.arange(5), None)[1]
['x', [1, 5, 4]]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch._ops import OpOverload

from fxadapt.ir.channels import Site

aten = torch.ops.aten


def set_shape_entry(op: OpOverload, args: list, site: Site, index: np.ndarray,
                    val: Any) -> tuple[OpOverload, list]:
    args = list(args)
    shape = list(args[site.arg])
    shape[site.index] = int(len(index))
    args[site.arg] = shape
    return op, positional(op, args)


def positional(op: OpOverload, args: list) -> list:
    """The positional part of schema-complete ``args`` (keyword-only ones, such as ``expand``'s
    ``implicit``, cannot be passed by position; they are dropped when they hold their default).

    >>> positional(aten.expand.default, ["x", [2, 3], False])
    ['x', [2, 3]]
    """
    schema = getattr(op, "_schema", None)
    if schema is None:
        return args
    n = sum(1 for a in schema.arguments if not a.kwarg_only)
    if not droppable(op, args):
        raise ValueError(f"{op}: keyword-only arguments {args[n:]} cannot be kept by position")
    return args[:n]


_EFFECTIVE = {"dtype": lambda v: v == torch.get_default_dtype(), "layout": lambda v: v == torch.strided,
              "device": lambda v: torch.device(v).type == "cpu", "pin_memory": lambda v: v is False}


def droppable(op: OpOverload, args: list) -> bool:
    """Whether the keyword-only part of schema-complete ``args`` equals what the op does without it (its
    defaults; a factory's default dtype, strided layout, CPU device, no pinned memory).

    >>> droppable(aten.zeros.default, [[2, 3], torch.get_default_dtype(), None, "cpu", False])
    True
    """
    schema = op._schema
    n = sum(1 for a in schema.arguments if not a.kwarg_only)
    return all(v is None or (a.has_default_value() and v == a.default_value) or
               _EFFECTIVE.get(a.name, lambda _: False)(v) for a, v in zip(schema.arguments[n:], args[n:]))


def set_count(op: OpOverload, args: list, site: Site, index: np.ndarray, val: Any) -> tuple[OpOverload, list]:
    args = list(args)
    args[site.arg] = int(len(index))
    return op, args


def resplit(op: OpOverload, args: list, site: Site, index: np.ndarray, val: Any) -> tuple[OpOverload, list]:
    dim = site.arg
    bounds = np.cumsum([0] + [v.shape[dim] for v in val])
    counts = [int(((index >= lo) & (index < hi)).sum()) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return aten.split_with_sizes.default, [args[0], counts, dim]


def _kept_run(site: Site, index: np.ndarray, name: str) -> tuple[int, int]:
    lo, hi = site.arg, site.index
    inside = np.flatnonzero((index >= lo) & (index < hi))
    if inside.size and np.any(np.diff(inside) != 1):
        raise ValueError(f"{name}: the sliced channels are not contiguous after the edit")
    return (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)


def reslice(op: OpOverload, args: list, site: Site, index: np.ndarray, val: Any) -> tuple[OpOverload, list]:
    start, end = _kept_run(site, index, site.node_name)
    args = list(args) + [None] * (4 - len(args))
    return op, [args[0], args[1] if args[1] is not None else 0, start, end] + list(args[4:])


def renarrow(op: OpOverload, args: list, site: Site, index: np.ndarray, val: Any) -> tuple[OpOverload, list]:
    start, end = _kept_run(site, index, site.node_name)
    args = list(args)
    args[2], args[3] = start, end - start
    return op, args
