"""Untracked operands that can still follow the channels of the tensor they are combined with.

A broadcast ``out = f(x, c)`` where ``x`` carries channels on axis ``k`` and ``c`` has full size there but no
track would pin the channels at full width, unless ``c`` is

- a parameter read element-wise: ``c = g(P)`` for a chain of element-wise one-tensor ops, casts and
  ``unsqueeze``/``squeeze``/full-range slices (``A = -exp(A_log.float())[None, :, None, :]``), so slicing
  ``P`` along the axis ``c``'s axis ``k`` reads slices ``c`` the same way: a ``const`` site on ``P``;
- a factory ``zeros/ones/full/empty(size)`` (or ``x.new_zeros(size)``): entry ``k`` of ``size`` follows the
  width (a ``shape_arg`` site on the factory node; its ``edit`` rewrites the entry);
- a zero tensor: ``zeros(size)`` seen through views, casts and products (``Z[..., n, k] @ W``, ``x @ Z``,
  ``Z * y``): every element is 0, so an axis whose size is entry ``j`` of the factory's ``size`` may take any
  size — the zero state of a gated delta-net (``S = zeros(B, H, d_k, d_v)``; ``k @ S``, ``q @ S``,
  ``v - k @ S``) follows ``d_k`` and ``d_v``. Entry ``j`` gets one set of labels (``zero_axis_labels``, a
  ``shape_arg`` site) that every use couples with; growth stays exact because new entries are zeros too.

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
from fxadapt.ops.core import Ctx, aten_ops, norm_dim

aten = torch.ops.aten
FACTORY_SIZE_ARG = {aten.zeros.default: 0, aten.ones.default: 0, aten.full.default: 0,
                    aten.empty.memory_format: 0, aten.new_zeros.default: 1, aten.new_ones.default: 1,
                    aten.new_full.default: 1, aten.new_empty.default: 1}
ZERO_FACTORIES = (aten.zeros.default, aten.new_zeros.default)
_CASTS = frozenset(aten_ops("to.dtype", "to.dtype_layout", "to.device", "to.other", "type_as.default",
                            "clone.default", "contiguous.default", "alias.default", "neg.default",
                            "_to_copy.default", "detach.default", "lift_fresh_copy.default"))
_PRODUCTS = frozenset([aten.matmul.default, aten.mm.default, aten.bmm.default])
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


def zero_source(ctx: Ctx, x: Any, depth: int = _MAX_CHAIN) -> tuple[Node, list[int | None]] | None:
    """The ``zeros`` factory whose elements ``x`` is made of (through casts, views, ``Z * y`` and matrix
    products with ``Z``) and, for every axis of ``x``, the factory axis its size is (``None`` where another
    operand gives the size); ``None`` when ``x`` is not provably zero."""
    if depth <= 0 or not isinstance(x, Node) or x.op != "call_function":
        return None
    if x.target in ZERO_FACTORIES:
        return x, list[int | None](range(len(shape_of(ctx, x))))
    for src, axes in _zero_inputs(ctx, x):
        found = zero_source(ctx, src, depth - 1)
        if found is not None:
            return found[0], [None if v is None else found[1][v] for v in axes]
    return None


def _zero_inputs(ctx: Ctx, node: Node) -> list[tuple[Node, list[int | None]]]:
    """The inputs of ``node`` whose being zero makes it zero, each with the input axis behind every output
    axis (``None`` where the size comes from elsewhere)."""
    t, args, nd = node.target, node.args, len(shape_of(ctx, node))
    if not args or not isinstance(args[0], Node):
        return []
    if t in _CASTS:
        return [(args[0], list(range(nd)))]
    if t == aten.transpose.int:
        d0, d1 = (norm_dim(d, nd) for d in args[1:3])
        perm = list(range(nd))
        perm[d0], perm[d1] = d1, d0
        return [(args[0], list[int | None](perm))]
    if t == aten.select.int:
        d = norm_dim(args[1], nd + 1)
        return [(args[0], [v + (v >= d) for v in range(nd)])]
    if t in (aten.mul.Tensor, aten.div.Tensor):
        return [(a, _broadcast_axes(ctx, a, node)) for a in args[:1 if t == aten.div.Tensor else 2]
                if isinstance(a, Node)]
    left, right = args[0], args[1] if len(args) > 1 else None
    if t in _PRODUCTS and isinstance(right, Node):
        return [(left, _product_axes(ctx, left, nd, False)), (right, _product_axes(ctx, right, nd, True))]
    axes = _through(ctx, node, list(range(nd)), _CASTS)
    return [] if axes is None else [(args[0], axes)]


def _broadcast_axes(ctx: Ctx, a: Node, out: Node) -> list[int | None]:
    """Output axis -> axis of the broadcast operand ``a`` of the same size (``None`` where ``a`` has 1)."""
    sa, so = shape_of(ctx, a), shape_of(ctx, out)
    off = len(so) - len(sa)
    return [v - off if v >= off and sa[v - off] == so[v] else None for v in range(len(so))]


def _product_axes(ctx: Ctx, a: Node, nd: int, right: bool) -> list[int | None]:
    """Output axis -> axis of the matrix product's operand ``a``: its rows (left) or columns (right), and
    its batch axes."""
    na = len(shape_of(ctx, a))
    out: list[int | None] = [v - (nd - na) if 0 <= v - (nd - na) < na - 2 else None for v in range(nd)]
    if right:
        out[nd - 1] = na - 1
    else:
        out[nd - 2] = na - 2
    return out


def zero_axis_labels(ctx: Ctx, x: Any, axis: int, make: bool = False) -> np.ndarray | None:
    """The labels that the size of ``x``'s ``axis`` follows when ``x`` is a zero tensor whose size there
    is an integer entry of a ``zeros`` factory (``zero_source``): one set per factory entry, made (with a
    ``shape_arg`` site) only by ``make``, i.e. when channels are coupled with it, so a zero axis never forms
    a group of its own; ``None`` otherwise."""
    src = zero_source(ctx, x)
    if src is None or not 0 <= axis < len(src[1]) or src[1][axis] is None:
        return None
    fac, fax = src[0], src[1][axis]
    key = (fac.name, fax)
    if key not in ctx.zero_axes and make:
        arg = FACTORY_SIZE_ARG[fac.target]
        size = fac.args[arg] if len(fac.args) > arg else None
        ok = (isinstance(size, (list, tuple)) and isinstance(size[fax], int)
              and edits.droppable(fac.target, _schema_args(fac)))
        labels = ctx.new(size[fax]) if ok else None
        if labels is not None:
            ctx.ledger.sites.append(Site("shape_arg", labels, "shape", fac.name, arg=arg, index=fax))
        ctx.zero_axes[key] = labels
    return ctx.zero_axes.get(key)


def zero_site(ctx: Ctx, a: Any, axis: int, labels: np.ndarray) -> bool:
    """Couple ``labels`` with the zero tensor ``a``'s size along ``axis`` (``zero_axis_labels``)."""
    own = zero_axis_labels(ctx, a, axis, make=True)
    if own is None or len(own) != len(labels):
        return False
    ctx.couple(own, labels)
    return True
