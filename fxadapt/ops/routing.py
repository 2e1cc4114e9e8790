"""Rules for routing ops (mixture of experts) and grouped matrix products.

A router ``logits = linear(h, W_r)`` produces one channel per expert; ``topk``/``sort`` along that axis pick
experts by value, so the result names expert positions as data: the expert channels freeze there (the
reason names the op), while channels on every other axis pass through to values and indices alike. The
tokens' hidden channels never reach ``topk`` (the router's linear contracts them).

Index ops on other axes move channels: ``x[idx]`` (``index.Tensor``) replaces the indexed axes by the
index tensor's axes, so channels on the remaining axes follow (gathering the tokens routed to the experts
keeps the hidden axis); indexing *along* a channel axis re-indexes it and blocks. ``index_put_`` writes
rows along untracked axes (a scatter of tokens back): its values must carry the destination's channels.
``one_hot`` adds a class axis; ``nonzero``/``histc`` turn values into positions/counts (no channels out).

Grouped matrix product (``transformers::grouped_mm_fallback``, ``aten._grouped_mm``, what transformers'
``grouped_mm`` experts implementation runs): ``x[S, K]`` with rows sorted by expert and ``W[E, K, N]``,
``out[s] = x[s] @ W[e(s)]``. ``K`` is coupled to the weight's contracted axis (one space for all
experts: a 3-D parameter holds one width per axis), ``N`` is a new channel space, like ``linear``. The
weight is the parameter itself or ``param.transpose(-2, -1)`` (transformers stores ``[E, N, K]``). Both
widths move in runs of ``16 / itemsize`` channels (the eager kernel's 16-byte stride rule, ``_ALIGN_BYTES``).
MACs: every row meets one expert's ``K x N`` matrix once: ``S * K * N``. With ``S = T * top_k`` rows for
``T`` tokens this is ``T * (top_k / E) * E * K * N``, the expected cost under any routing — and, as the
rows are a fixed count, the count of the run at any input as well (``fxadapt.analysis.count``).

>>> import torch
>>> from fxadapt.ops import OPS
>>> OPS[torch.ops.aten.topk.default].kind, OPS.get("transformers.grouped_mm_fallback.default").kind
('reindexes', 'couples')
"""

from __future__ import annotations

import math

from torch.fx import Node

from fxadapt.ir.channels import ParamRef, Track
from fxadapt.ops.core import Blocked, aten_ops, norm_dim, only_axis, rule
from fxadapt.ops.indexing import _TRANSPOSE_DIMS, _TRANSPOSES


def _by_value(call, ctx, what: str):
    """``topk`` / ``sort`` along ``dim``: channels on that axis freeze, others pass to both outputs."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    dim = norm_dim(call.arg(2 if what == "topk" else 1, "dim", -1), len(ctx.shape(x)))
    if t is not None and dim in t.axes:
        ctx.freeze(t, f"{what} along the channel axis names channel positions as data (router experts)")
        return None, None
    return t, t


@rule(*aten_ops("topk.default"), kind="reindexes")
def topk(call, ctx):
    return _by_value(call, ctx, "topk")


@rule(*aten_ops("sort.default", "sort.stable"), kind="reindexes", name="topk")
def sort(call, ctx):
    return _by_value(call, ctx, "sort")


@rule(*aten_ops("histc.default", "nonzero.default", "argwhere.default", "bincount.default"), kind="reindexes")
def positions(call, ctx):
    """Counts and positions computed from values: nothing of the input's channel layout survives."""
    if ctx.track(call.arg(0, "self")) is not None:
        return Blocked(f"{call.op} turns the values of a tensor with channels into positions or counts")
    return None


@rule(*aten_ops("one_hot.default"), kind="reindexes")
def one_hot(call, ctx):
    """``[...] -> [..., C]``: channels on the input's axes stay where they are."""
    return ctx.track(call.arg(0, "self"))


@rule(*aten_ops("floor_divide.default", "remainder.Scalar", "fmod.Scalar", "floor_divide.Scalar"),
      kind="passes", name="unary")
def integer_arith(call, ctx):
    """Element-wise integer arithmetic with a scalar (``perm // top_k``)."""
    if isinstance(call.arg(1, "other"), Node):
        return Blocked(f"{call.op} with a tensor operand has no channel rule")
    return ctx.track(call.arg(0, "self"))


def _indexed_axes(indices) -> tuple[int, int] | None:
    """``(first, last + 1)`` of the axes a consecutive run of index tensors indexes (None: not consecutive)."""
    used = [i for i, ix in enumerate(indices) if ix is not None]
    if not used or used != list(range(used[0], used[-1] + 1)):
        return None
    return used[0], used[-1] + 1


@rule(*aten_ops("index.Tensor", "_unsafe_index.Tensor"), kind="reindexes", name="gather_like")
def index(call, ctx):
    """``x[..., idx, ...]``: the indexed axes become the index tensor's axes; channels elsewhere follow."""
    x, indices = call.arg(0, "self"), list(call.arg(1, "indices"))
    t = ctx.track(x)
    if t is None:
        return None
    span = _indexed_axes(indices)
    if span is None:
        return Blocked("index.Tensor with non-consecutive index tensors (the indexed axes move to the front)")
    lo, hi = span
    if any(lo <= a < hi for a in t.axes):
        return Blocked("index.Tensor re-indexes the channel axis")
    shift = len(ctx.out_shape()) - len(ctx.shape(x))
    return t.moved({a: a + shift if a >= hi else a for a in t.axes})


@rule(*aten_ops("index_put_.default", "index_put.default"), kind="reindexes", name="gather_like")
def index_put(call, ctx):
    """``out = x; out[idx] = values`` along untracked axes: values carry the destination's channels."""
    x, indices, values = call.arg(0, "self"), list(call.arg(1, "indices")), call.arg(2, "values")
    t, tv = ctx.track(x), ctx.track(values)
    if t is None and tv is None:
        return None
    span = _indexed_axes(indices)
    if span is None or any(span[0] <= a < span[1] for a in (t.axes if t is not None else ())):
        return Blocked("index_put_ writes along the channel axis")
    nd, nv = len(ctx.shape(x)), len(ctx.shape(values))
    tv = tv.moved({a: a + nd - nv for a in tv.axes}) if tv is not None else None
    if t is not None and tv is not None and t.axes == tv.axes and t.labels.shape == tv.labels.shape:
        ctx.couple(t.labels, tv.labels)
        return t
    return Blocked("index_put_ of values whose channels differ from the destination's")


def _expert_weight(ctx, w) -> tuple[ParamRef, int, int] | None:
    """The grouped weight ``[E, K, N]`` as ``(param, K axis, N axis)`` of the parameter itself, or of the
    parameter a ``transpose(-2, -1)`` reads."""
    if isinstance(w, ParamRef):
        return (w, 1, 2) if len(ctx.shape(w)) == 3 else None
    if not (isinstance(w, Node) and w.target in _TRANSPOSES and w.args):
        return None
    src = w.args[0]
    if not (isinstance(src, Node) and src.op == "get_attr") or len(ctx.shape(ParamRef(src.target)) or ()) != 3:
        return None
    if w.target not in _TRANSPOSE_DIMS or {norm_dim(d, 3) for d in w.args[1:3]} != {1, 2}:
        return None
    return ParamRef(src.target), 2, 1


def grouped_mm_macs(call, cx):
    """``S * K * N`` = ``(S / E) * E * K * N`` (see the module docstring)."""
    x, w = call.args[0], _expert_weight(cx.ctx, call.args[1])
    rows = cx.shape(x)[0]
    if w is None:
        return float(rows * math.prod(cx.shape(call.args[1])[1:])), []
    return rows / cx.shape(w[0])[0], cx.weight_factors(w[0])


@rule(*aten_ops("_grouped_mm.default"), "transformers.grouped_mm_fallback.default", kind="couples",
      cost=grouped_mm_macs)
def grouped_mm(call, ctx):
    x, w = call.args[0], call.args[1]
    if len(ctx.shape(x)) != 2 or len(ctx.shape(w)) != 3:
        return Blocked("grouped matrix product other than rows [S, K] by experts [E, K, N]")
    if call.arg(3, "bias") is not None:
        return Blocked("grouped matrix product with a bias")
    lx = only_axis(ctx, ctx.track(x), 1, "a grouped matmul contraction")
    weight = _expert_weight(ctx, w)
    if weight is None:
        ctx.freeze(lx, "contracted with expert weights computed at run time")
        ctx.freeze(ctx.track(w), "expert weights computed at run time")
        return None
    ref, k_axis, n_axis = weight
    step = _ALIGN_BYTES // max(1, _itemsize(x))
    if lx is not None:
        _in_runs(ctx, lx, step)
        ctx.param_site(ref, k_axis, lx, "in")
    new = ctx.new(ctx.shape(w)[2])
    _in_runs(ctx, new, step)
    ctx.param_site(ref, n_axis, new, "out")
    return Track((1,), new)


_ALIGN_BYTES = 16
"""``torch.nn.functional.grouped_mm`` (what transformers runs in eager mode where torch has it) needs every
stride a multiple of 16 bytes: both widths of a grouped product stay multiples of ``16 / itemsize``."""


def _itemsize(x) -> int:
    val = x.meta.get("val") if isinstance(x, Node) else None
    return val.dtype.itemsize if val is not None and hasattr(val, "dtype") else 4


def _in_runs(ctx, labels, step: int) -> None:
    """Channels kept or removed ``step`` at a time: consecutive runs of ``step`` positions are one unit."""
    if step > 1 and len(labels) % step == 0:
        runs = labels.reshape(-1, step)
        ctx.couple(runs, runs[:, :1])
