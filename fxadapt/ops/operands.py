"""Untracked operands that can still follow the channels of the tensor they are combined with.

A broadcast ``out = f(x, c)`` where ``x`` carries channels on axis ``k`` and ``c`` has full size there but no
track would pin the channels at full width, unless ``c`` is

- a parameter read element-wise: ``c = g(P)`` for a chain of element-wise one-tensor ops, casts and
  ``unsqueeze``/``squeeze``/full-range slices (``A = -exp(A_log.float())[None, :, None, :]``), so slicing
  ``P`` along the axis ``c``'s axis ``k`` reads slices ``c`` the same way: a ``const`` site on ``P``;
- a factory ``zeros/ones/full/empty(size)`` (or ``x.new_zeros(size)``): entry ``k`` of ``size`` follows the
  width (a ``shape_arg`` site on the factory node; its ``edit`` rewrites the entry).

>>> import torch
>>> from fxadapt.ops.operands import FACTORY_SIZE_ARG
>>> FACTORY_SIZE_ARG[torch.ops.aten.new_zeros.default]
1
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from fxadapt.ir.channels import ParamRef, Site
from fxadapt.ops import edits
from fxadapt.ops.core import Ctx, norm_dim

aten = torch.ops.aten
FACTORY_SIZE_ARG = {aten.zeros.default: 0, aten.ones.default: 0, aten.full.default: 0,
                    aten.empty.memory_format: 0, aten.new_zeros.default: 1, aten.new_ones.default: 1,
                    aten.new_full.default: 1, aten.new_empty.default: 1}
_MAX_CHAIN = 16


def shape_of(ctx: Ctx, x: Any) -> tuple:
    return tuple(ctx.shape(x) or ())


def param_source(ctx: Ctx, x: Any, elementwise: frozenset) -> tuple[ParamRef, list[int | None]] | None:
    """The parameter ``x`` reads element-wise and, for every axis of ``x``, the parameter axis it reads
    (``None`` where an ``unsqueeze`` inserted it); ``None`` when ``x`` is anything else.
    ``elementwise``: the one-tensor element-wise ops (casts, ``exp``, ``neg``, ...)."""
    node, axes = x, list[int | None](range(len(shape_of(ctx, x))))
    for _ in range(_MAX_CHAIN):
        if isinstance(node, ParamRef):
            return node, axes
        if not isinstance(node, Node):
            return None
        if node.op == "get_attr":
            return ParamRef(str(node.target)), axes   # a get_attr's target is its dotted name
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
            return None
        if any(isinstance(a, Node) for a in [*node.args[1:], *node.kwargs.values()]):
            return None
        axes = _through(ctx, node, axes, elementwise)
        if axes is None:
            return None
        node = node.args[0]
    return None


def _through(ctx: Ctx, node: Node, axes: list[int | None], elementwise: frozenset) -> list[int | None] | None:
    """``axes`` (x's axis -> this node's axis) re-expressed on the node's input, or None if not a view."""
    t, args = node.target, node.args
    if t in elementwise:
        return axes
    if t == aten.unsqueeze.default:
        d = norm_dim(args[1], len(ctx.shape(node)))
        return [None if v is None or v == d else v - (v > d) for v in axes]
    if t == aten.squeeze.dim:
        d = norm_dim(args[1], len(ctx.shape(args[0])))
        return [None if v is None else v + (v >= d) for v in axes]
    if t == aten.slice.Tensor:
        dim = norm_dim(args[1] if len(args) > 1 else 0, len(ctx.shape(node)))
        start, end = (list(args[2:4]) + [None, None])[:2]
        step = args[4] if len(args) > 4 else 1
        full = (start in (None, 0) and step == 1
                and (end is None or end >= ctx.shape(args[0])[dim]))
        return axes if full else None
    return None


def param_axis_site(ctx: Ctx, a: Any, axis: int, labels: np.ndarray, elementwise: frozenset) -> bool:
    """A ``const`` site on the parameter ``a`` reads element-wise, along the parameter axis behind ``a``'s
    ``axis``; False when there is none (or its size differs from the channels')."""
    src = param_source(ctx, a, elementwise)
    if src is None or not 0 <= axis < len(src[1]) or src[1][axis] is None:
        return False
    ref, p_axis = src[0], src[1][axis]
    if ctx.shape(ref)[p_axis] != len(labels):
        return False
    ctx.param_site(ref, p_axis, labels, "const")
    return True


def factory_site(ctx: Ctx, a: Any, axis: int, labels: np.ndarray) -> bool:
    """A ``shape_arg`` site on a factory node for entry ``axis`` of its size list (default dtype/layout/device
    keyword arguments only, so the edit can pass the rest by position); False for anything else."""
    if not isinstance(a, Node) or a.op != "call_function" or a.target not in FACTORY_SIZE_ARG:
        return False
    arg = FACTORY_SIZE_ARG[a.target]
    size = a.args[arg] if len(a.args) > arg else None
    if not isinstance(size, (list, tuple)) or not 0 <= axis < len(size) or size[axis] != len(labels):
        return False
    if not edits.droppable(a.target, _schema_args(a)):
        return False
    ctx.ledger.sites.append(Site("shape_arg", np.asarray(labels).reshape(-1), "shape", a.name, arg=arg,
                                 index=axis))
    return True


def _schema_args(node: Node) -> list:
    """The node's arguments in schema order (keywords filled in, defaults where absent)."""
    out = []
    for i, s in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out.append(node.args[i])
        else:
            out.append(node.kwargs.get(s.name, s.default_value if s.has_default_value() else None))
    return out
