"""Rules for routing ops (mixture of experts) and grouped matrix products.

A router ``logits = linear(h, W_r)`` produces one channel per expert. ``topk`` along that axis turns the
channels into *expert ids*: values that are positions along the expert axis (``Ctx.ids``: node -> the
expert labels). The ids flow through value-preserving ops (views, dtype casts, ``getitem``, the values of a
``sort``) to ``histc(ids, bins=E, min=0, max=E-1)``: tokens per expert, a tensor whose axis 0 *is* the
expert axis again (its ``cumsum`` is the grouped product's offsets). So the expert channels reach the 3-D
expert weights' axis 0 (``grouped_mm``'s ``offs``), and removing experts is a slice like any other:

- the router's rows ``W_r[kept]``, the expert tensors ``W[kept]`` (axis 0), and histc's ``bins``/``max``
  set to ``E'``/``E' - 1`` (``rebin``); ``topk`` then returns ids in ``[0, E')``, which name
  ``kept[id]`` in the original numbering, the same order every sliced tensor uses. With the removed
  experts never routed to, the result equals the original exactly: ``softmax`` then top-k then
  renormalisation (Mixtral) does not depend on the logits of experts outside the top-k.
- the *floor*: a token takes ``top_k`` distinct experts, so at least ``top_k`` stay (``EXPERTS_FLOOR``;
  an ``"experts"`` site records ``top_k``, ``Group.top_k`` reads it).
- growth is refused (``EXPERTS_NO_GROWTH``): a copy of an expert under softmax-then-top-k routing can
  displace another expert from a token's top-k, so no duplicate is function-preserving.
- one width per axis: the fused ``[E, 2I, H]`` tensors hold one intermediate width for every expert, so the
  experts share one intermediate width (``EXPERTS_ONE_WIDTH``); per-expert widths would need one tensor
  per expert.

Ids reaching any other op (``one_hot``, an index into a tensor, the model output: transformers' eager
per-expert loop) freeze the experts with a reason naming the op: only the histogram is renumbered.
Under top-k routing the MACs per token do not depend on ``E`` (a token runs ``top_k`` experts; only the
router's ``H * E`` does), so expert groups are removed by parameter budgets only (``Analysis.experts``).

Index ops on other axes move channels: ``x[idx]`` (``index.Tensor``) replaces the indexed axes by the
index tensor's axes, so channels on the remaining axes follow (gathering the tokens routed to the experts
keeps the hidden axis); indexing *along* a channel axis re-indexes it and blocks. ``index_put_`` writes
rows along untracked axes (a scatter of tokens back): its values must carry the destination's channels.
``one_hot`` adds a class axis; ``nonzero``/``bincount`` (and ``histc`` of anything but expert ids) turn
values into positions/counts (no channels out).

Grouped matrix product (``transformers::grouped_mm_fallback``, ``aten._grouped_mm``, what transformers'
``grouped_mm`` experts implementation runs): ``x[S, K]`` with rows sorted by expert and ``W[E, K, N]``,
``out[s] = x[s] @ W[e(s)]``. ``K`` is coupled to the weight's contracted axis (one space for all
experts: a 3-D parameter holds one width per axis), ``N`` is a new channel space, like ``linear``; ``E``
follows the offsets. The weight is the parameter itself or ``param.transpose(-2, -1)`` (transformers
stores ``[E, N, K]``). Both widths move in runs of ``16 / itemsize`` channels (the eager kernel's 16-byte
stride rule, ``_ALIGN_BYTES``). MACs: every row meets one expert's ``K x N`` matrix once: ``S * K * N``,
whatever ``E``. With ``S = T * top_k`` rows for ``T`` tokens this is the cost under any routing — and, as
the rows are a fixed count, the count of the run at any input as well (``fxadapt.analysis.count``).

>>> import torch
>>> from fxadapt.ops import OPS
>>> OPS[torch.ops.aten.topk.default].kind, OPS.get("transformers.grouped_mm_fallback.default").kind
('reindexes', 'couples')
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
from torch._ops import OpOverload
from torch.fx import Node

from fxadapt.ir.channels import ParamRef, Site, Track
from fxadapt.ops.core import Blocked, Call, Ctx, aten_ops, norm_dim, only_axis, rule
from fxadapt.ops.forms import CostView
from fxadapt.ops.indexing import TRANSPOSE_DIMS, TRANSPOSES

EXPERTS_FLOOR = "a token is routed to top_k distinct experts: at least top_k experts stay"
EXPERTS_NO_GROWTH = ("duplicating an expert is not function-preserving under softmax-then-top-k routing: the "
                     "copy takes a place in the tokens' top-k and displaces another expert")
EXPERTS_ONE_WIDTH = ("the experts' fused 3-D tensors hold one intermediate width per axis: every expert of a "
                     "layer keeps the same intermediate width")
_IDS_REASON = ("topk along the channel axis names channel positions as data (router experts): the expert ids "
               "reach {what}; only a histc with one bin per expert (transformers' grouped_mm experts) is "
               "renumbered when experts are removed")

_CARRY_IDS = (*aten_ops("view.default", "reshape.default", "_unsafe_view.default", "to.dtype",
                        "_to_copy.default", "clone.default", "contiguous.default", "alias.default",
                        "flatten.using_ints"),)
_READ_IDS = (*aten_ops("sort.default", "sort.stable", "histc.default", "_assert_tensor_metadata.default"),)


def _ids_of(ctx: Ctx, x):
    return ctx.ids.get(x.name) if isinstance(x, Node) else None


def _freeze_ids(ctx: Ctx, ids, what: str) -> None:
    for labels in ids if isinstance(ids, tuple) else (ids,):
        ctx.freeze(labels, _IDS_REASON.format(what=what))


def follow_ids(node: Node, ctx: Ctx) -> None:
    """Before ``node``'s rule: carry expert ids through value-preserving ops and ``getitem``; freeze them
    where anything else reads them (module docstring). ``sort`` and ``histc`` read them in their rules."""
    srcs = [n for n in node.all_input_nodes if n.name in ctx.ids]
    if not srcs:
        return
    if node.op == "call_function" and node.target is operator.getitem:
        ids = ctx.ids[srcs[0].name]
        if isinstance(ids, tuple) and ids[node.args[1]] is not None:
            ctx.ids[node.name] = ids[node.args[1]]
        return
    first = node.args[0] if node.args else None
    if node.op == "call_function" and node.target in _CARRY_IDS and isinstance(first, Node) \
            and srcs == [first] \
            and not isinstance(ctx.ids[first.name], tuple):
        ctx.ids[node.name] = ctx.ids[first.name]
        return
    if node.op == "call_function" and (node.target in _READ_IDS or _reads_expert_rows(node, ctx)):
        return
    what = "the model output" if node.op == "output" else str(getattr(node, "target", node.op))
    for n in srcs:
        _freeze_ids(ctx, ctx.ids[n.name], what)


def _by_value(call: Call, ctx: Ctx, what: str):
    """``topk`` / ``sort`` along ``dim``: channels on the other axes pass to both outputs. ``topk`` along the
    only channel axis with a constant ``k`` makes expert ids (module docstring); ``sort`` of expert ids keeps
    them in its values; any other sort or topk along a channel axis freezes those channels."""
    x = call.arg(0, "self")
    t, ids = ctx.track(x), _ids_of(ctx, x)
    if ids is not None and what == "sort" and not isinstance(ids, tuple):
        ctx.ids[ctx.node.name] = (ids, None)
        return None, None
    dim = norm_dim(call.arg(2 if what == "topk" else 1, "dim", -1), len(ctx.shape(x)))
    if t is None or dim not in t.axes:
        return t, t
    k = call.arg(1, "k")
    if what == "topk" and t.axes == (dim,) and isinstance(k, int) and 0 < k < len(t.labels):
        ctx.site("experts", t.labels, "experts", index=k)
        ctx.ids[ctx.node.name] = (None, t.labels)
        return None, None
    ctx.freeze(t, f"{what} along the channel axis names channel positions as data (router experts)")
    return None, None


@rule(*aten_ops("topk.default"), kind="reindexes")
def topk(call: Call, ctx: Ctx):
    return _by_value(call, ctx, "topk")


@rule(*aten_ops("sort.default", "sort.stable"), kind="reindexes", name="topk")
def sort(call: Call, ctx: Ctx):
    return _by_value(call, ctx, "sort")


@rule(*aten_ops("nonzero.default", "argwhere.default", "bincount.default"), kind="reindexes")
def positions(call: Call, ctx: Ctx):
    """Counts and positions computed from values: nothing of the input's channel layout survives."""
    if ctx.track(call.arg(0, "self")) is not None:
        return Blocked(f"{call.op} turns the values of a tensor with channels into positions or counts")
    return None


def rebin(op: OpOverload, args: list, site: Site, index: np.ndarray, val: Any) -> tuple[OpOverload, list]:
    """``histc(ids, bins=E, min=0, max=E-1)`` -> ``bins=E'``, ``max=E'-1`` (``OpSpec.edit``)."""
    args = list(args) + [None] * (4 - len(args))
    args[1], args[2], args[3] = int(len(index)), 0, int(len(index)) - 1
    return op, args


@rule(*aten_ops("histc.default"), kind="reindexes", edit=rebin)
def histc(call: Call, ctx: Ctx):
    """Tokens per expert: ``histc`` of expert ids with one bin per expert has the expert axis as axis 0."""
    x = call.arg(0, "self")
    ids = _ids_of(ctx, x)
    if ids is None:
        return positions(call, ctx)
    bins, lo, hi = call.arg(1, "bins", 100), call.arg(2, "min", 0), call.arg(3, "max", 0)
    if isinstance(ids, tuple) or (bins, lo, hi) != (len(ids), 0, len(ids) - 1):
        _freeze_ids(ctx, ids, f"histc with bins={bins}, min={lo}, max={hi} (not one bin per expert)")
        return None
    ctx.site("shape_arg", ids, "shape", arg=1)
    return Track((0,), ids)


@rule(*aten_ops("one_hot.default"), kind="reindexes")
def one_hot(call: Call, ctx: Ctx):
    """``[...] -> [..., C]``: channels on the input's axes stay where they are."""
    return ctx.track(call.arg(0, "self"))


@rule(*aten_ops("floor_divide.default", "remainder.Scalar", "fmod.Scalar", "floor_divide.Scalar"),
      kind="passes", name="unary")
def integer_arith(call: Call, ctx: Ctx):
    """Element-wise integer arithmetic with a scalar (``perm // top_k``)."""
    if isinstance(call.arg(1, "other"), Node):
        return Blocked(f"{call.op} with a tensor operand has no channel rule")
    return ctx.track(call.arg(0, "self"))


def _indexed_axes(indices) -> tuple[int, int] | None:
    """``(first, last + 1)`` of the axes a consecutive run of index tensors indexes (None: not
    consecutive)."""
    used = [i for i, ix in enumerate(indices) if ix is not None]
    if not used or used != list(range(used[0], used[-1] + 1)):
        return None
    return used[0], used[-1] + 1


@rule(*aten_ops("index.Tensor", "_unsafe_index.Tensor"), kind="reindexes", name="gather_like")
def index(call: Call, ctx: Ctx):
    """``x[..., idx, ...]``: the indexed axes become the index tensor's axes; channels elsewhere follow."""
    x, indices = call.arg(0, "self"), list(call.arg(1, "indices"))
    t = ctx.track(x)
    if t is None:
        return _expert_rows(ctx, x, indices)
    span = _indexed_axes(indices)
    if span is None:
        return Blocked("index.Tensor with non-consecutive index tensors (the indexed axes move to the front)")
    lo, hi = span
    if any(lo <= a < hi for a in t.axes):
        return Blocked("index.Tensor re-indexes the channel axis")
    shift = len(ctx.out_shape()) - len(ctx.shape(x))
    return t.moved({a: a + shift if a >= hi else a for a in t.axes})


def _expert_rows(ctx: Ctx, x, indices):
    """``b[ids]``: a 2-D parameter ``[E, N]`` gathered by expert ids (gpt-oss's per-expert biases, one row per
    routed token): axis 0 is the expert axis (sliced with the experts), axis 1 a new channel space (a bias
    of the grouped product it is added to)."""
    shape = ctx.shape(x)
    ids = _ids_of(ctx, indices[0]) if len(indices) == 1 else None
    if not isinstance(x, ParamRef) or ids is None or isinstance(ids, tuple) or len(shape) != 2 \
            or len(ids) != shape[0]:
        return None
    ctx.param_site(x, 0, ids, "out")
    new = ctx.new(shape[1])
    ctx.param_site(x, 1, new, "bias")
    return Track((len(ctx.out_shape()) - 1,), new)


def _reads_expert_rows(node: Node, ctx: Ctx) -> bool:
    """``param[ids]`` by expert ids alone (``_expert_rows`` renumbers it with the experts)."""
    return (node.op == "call_function" and node.target in _INDEX and isinstance(node.args[0], Node)
            and node.args[0].op == "get_attr" and len(node.args[1]) == 1 and isinstance(node.args[1][0], Node)
            and node.args[1][0].name in ctx.ids and not isinstance(ctx.ids[node.args[1][0].name], tuple))


_INDEX = (*aten_ops("index.Tensor", "_unsafe_index.Tensor"),)


@rule(*aten_ops("index_put_.default", "index_put.default"), kind="reindexes", name="gather_like")
def index_put(call: Call, ctx: Ctx):
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


def _expert_weight(ctx: Ctx, w) -> tuple[ParamRef, int, int] | None:
    """The grouped weight ``[E, K, N]`` as ``(param, K axis, N axis)`` of the parameter itself, or of the
    parameter a ``transpose(-2, -1)`` reads."""
    if isinstance(w, ParamRef):
        return (w, 1, 2) if len(ctx.shape(w)) == 3 else None
    if not (isinstance(w, Node) and w.target in TRANSPOSES and w.args):
        return None
    src = w.args[0]
    if not (isinstance(src, Node) and src.op == "get_attr") \
            or len(ctx.shape(ParamRef(str(src.target))) or ()) != 3:
        return None
    if w.target not in TRANSPOSE_DIMS or {norm_dim(d, 3) for d in w.args[1:3]} != {1, 2}:
        return None
    return ParamRef(str(src.target)), 2, 1


def grouped_mm_macs(call: Call, cx: CostView):
    """``S * K * N`` whatever ``E`` (see the module docstring): the weight's factors but its expert axis."""
    x, w = call.args[0], _expert_weight(cx.ctx, call.args[1])
    rows = cx.shape(x)[0]
    if w is None:
        return float(rows * math.prod(cx.shape(call.args[1])[1:])), []
    return float(rows), cx.weight_factors(w[0])[1:]


@rule(*aten_ops("_grouped_mm.default"), "transformers.grouped_mm_fallback.default", kind="couples",
      cost=grouped_mm_macs)
def grouped_mm(call: Call, ctx: Ctx):
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
        ctx.freeze(ctx.track(call.arg(2, "offs")), "offsets of expert weights computed at run time")
        return None
    ref, k_axis, n_axis = weight
    _experts_axis(call, ctx, ref)
    step = _ALIGN_BYTES // max(1, _itemsize(x))
    if lx is not None:
        _in_runs(ctx, lx, step)
        ctx.param_site(ref, k_axis, lx, "in")
    new = ctx.new(ctx.shape(w)[2])
    _in_runs(ctx, new, step)
    ctx.param_site(ref, n_axis, new, "out")
    return Track((1,), new)


def _experts_axis(call: Call, ctx: Ctx, ref: ParamRef) -> None:
    """Offsets with the expert channels (``cumsum(histc(ids))``) put them on the weight's axis 0."""
    offs = ctx.track(call.arg(2, "offs"))
    if offs is None:
        return
    if offs.axes != (0,) or len(offs.labels) != ctx.shape(ref)[0]:
        ctx.freeze(offs, "grouped product offsets that are not one per expert")
        return
    ctx.param_site(ref, 0, offs.labels, "out")


_ALIGN_BYTES = 16
"""``torch.nn.functional.grouped_mm`` (what transformers runs in eager mode where torch has it) needs every
stride a multiple of 16 bytes: both widths of a grouped product stay multiples of ``16 / itemsize``."""


def _itemsize(x) -> int:
    val = x.meta.get("val") if isinstance(x, Node) else None
    return val.dtype.itemsize if val is not None and hasattr(val, "dtype") else 4


def _in_runs(ctx: Ctx, labels, step: int) -> None:
    """Channels kept or removed ``step`` at a time: consecutive runs of ``step`` positions are one unit."""
    if step > 1 and len(labels) % step == 0:
        runs = labels.reshape(-1, step)
        ctx.couple(runs, runs[:, :1])
