"""Rules for shape-preserving and broadcasting ops: activations, arithmetic, pooling, reductions.

Broadcasting ``out = f(a, b, ...)``: operands are right-aligned to the output. For every tracked output
axis, an operand that has the full size there must carry the same channels — its labels are unioned with
the reference operand's (residual add, SE multiply). An operand of size 1 there is broadcast and does not
couple (its own labels, if any, are frozen: a one-channel producer cannot shrink). A parameter or buffer
of full size — directly or through element-wise ops (``-exp(A_log.float())``) — is sliced with the channels
(a ``const`` site), a ``zeros``/``ones``/``full`` factory has its size entry rewritten (``shape_arg``), so
has the factory behind a zero tensor (``zeros`` seen through views and products: a scan's zero state); any
other fixed-size tensor freezes them (``fxadapt.ops.operands``).

Operands carrying channels on disjoint axes meet in an outer product of two channel spaces (Mamba's
``delta[:, :, :, None] * B[:, None, :, :]``: ``d_inner`` on axis 1, ``d_state`` on axis 3). A ``Track``'s
labels are joint over its axes (one space per tensor), so the output carries the larger space and the
smaller one is frozen with a reason naming both; reductions and contractions that follow see one space.
When the smaller space's tensor spans the larger one's axes at full size (heads folded into rows, met by a
gate with rows of its own), the larger space cannot follow either and freezes too.

``tril``/``triu`` (a causal mask within a chunk) pass channels on other axes and freeze those on the two
masked axes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.fx import Node

from fxadapt.ir.channels import ParamRef, Track
from fxadapt.ops import edits, lifts, operands
from fxadapt.ops.core import Blocked, Call, Ctx, aten_ops, axis_labels, norm_dim, rule
from fxadapt.ops.registry import SYM_ARITH, Lift, register

ZERO_UNARY = aten_ops(  # f(0) == 0
    "relu.default", "relu_.default", "relu6.default", "relu6_.default", "hardtanh.default",
    "hardtanh_.default", "tanh.default", "tanh_.default", "gelu.default", "gelu_.default", "silu.default",
    "silu_.default", "hardswish.default", "hardswish_.default", "leaky_relu.default", "leaky_relu_.default",
    "elu.default", "elu_.default", "selu.default", "selu_.default", "celu.default", "mish.default",
    "mish_.default", "neg.default", "sqrt.default", "abs.default", "erf.default", "sin.default",
    "square.default", "sign.default", "mul.Scalar", "div.Scalar", "contiguous.default", "clone.default",
    "detach.default", "detach_.default", "alias.default", "lift_fresh_copy.default", "_to_copy.default",
    "to.dtype", "to.device", "to.dtype_layout", "type_as.default", "floor.default", "ceil.default",
    "round.default", "dropout_.default", "feature_alpha_dropout.default",
)
OTHER_UNARY = aten_ops(
    "sigmoid.default", "sigmoid_.default", "hardsigmoid.default", "hardsigmoid_.default", "softplus.default",
    "clamp.default", "clamp_.default", "clamp_min.default", "clamp_max.default", "exp.default", "log.default",
    "rsqrt.default", "reciprocal.default", "cos.default", "pow.Tensor_Scalar", "add.Scalar", "sub.Scalar",
    "rsub.Scalar", "logical_not.default", "zeros_like.default", "ones_like.default", "empty_like.default",
    "full_like.default", "rand_like.default", "randn_like.default", "bernoulli.p", "fill.Scalar",
    "isnan.default", "gt.Scalar", "lt.Scalar", "ge.Scalar", "le.Scalar", "eq.Scalar", "ne.Scalar",
)
ELEMENTWISE = frozenset(ZERO_UNARY + OTHER_UNARY) - frozenset(aten_ops(
    "zeros_like.default", "ones_like.default", "empty_like.default", "full_like.default", "rand_like.default",
    "randn_like.default", "bernoulli.p", "fill.Scalar"))  # read their input's values, one element each
PARAM_READS = ELEMENTWISE | frozenset(aten_ops("add.Tensor", "sub.Tensor", "mul.Tensor", "div.Tensor",
                                               "rsub.Tensor"))
"""Ops through which an operand still reads a parameter element by element when every other argument is a
scalar (``operands.param_source`` refuses tensor arguments): ``1.0 + weight`` (zero-centred norm weights)."""
MIXING = aten_ops("softmax.int", "_softmax.default", "log_softmax.int", "_log_softmax.default",
                  "cumsum.default")


def unary(call: Call, ctx: Ctx):
    """Shape-preserving op of one tensor (extra arguments are scalars or dims): labels pass through."""
    return ctx.track(call.arg(0, "self"))


register(*ZERO_UNARY, name="unary", kind="passes", channels=unary, zero="preserves")
register(*OTHER_UNARY, name="unary", kind="passes", channels=unary)
for _names, _build in ((("dropout.default",), lifts.build_dropout),
                       (("feature_dropout.default",), lifts.build_feature_dropout),
                       (("alpha_dropout.default",), lifts.build_alpha_dropout)):
    register(*aten_ops(*_names), name="unary", kind="passes", channels=unary, zero="preserves",
             lift=Lift(_build, (0,)))


@rule(*MIXING, kind="passes", name="unary")
def mixing(call: Call, ctx: Ctx):
    """softmax/cumsum along a channel axis mixes the channels (no function-preserving growth there);
    labels pass through."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is not None and isinstance(call.arg(1, "dim"), int) \
            and norm_dim(call.arg(1, "dim"), len(ctx.shape(x))) in t.axes:
        ctx.site("mix", t.labels, "mix")
    return t


@rule(*aten_ops("prelu.default"), kind="passes", name="unary", zero="preserves")
def prelu(call: Call, ctx: Ctx):
    """A per-channel slope (more than one) is sliced with the channels."""
    x, w = call.arg(0, "self"), call.arg(1, "weight")
    t = ctx.track(x)
    if t is not None and 1 in t.axes and ctx.shape(w) and ctx.shape(w)[0] > 1:
        ctx.param_site(w, 0, axis_labels(ctx, t, 1), "norm")
    return t


SUMS = aten_ops("add.Tensor", "add_.Tensor")
PRODUCTS = aten_ops("mul.Tensor", "mul_.Tensor")
BINARY = aten_ops(
    "sub.Tensor", "sub_.Tensor", "div.Tensor",
    "div_.Tensor", "div.Tensor_mode", "maximum.default", "minimum.default", "max.other", "min.other",
    "pow.Tensor_Tensor",
    "eq.Tensor", "ne.Tensor", "gt.Tensor", "lt.Tensor", "ge.Tensor", "le.Tensor", "atan2.default",
    "where.self", "where.ScalarOther", "where.ScalarSelf", "where.Scalar", "masked_fill.Scalar",
    "masked_fill.Tensor", "rsub.Tensor", "clamp.Tensor", "copy.default", "copy_.default",
    "logical_and.default", "logical_or.default", "bitwise_and.Tensor", "addcmul.default", "addcdiv.default",
    "lerp.Tensor", "lerp.Scalar", "hardtanh_backward.default",
)


def _aligned(ctx: Ctx, x, nd: int) -> tuple[tuple, Track | None]:
    """Operand shape right-aligned to ``nd`` dims, and its track moved to output axes."""
    shape = ctx.shape(x) or ()
    off = nd - len(shape)
    t = ctx.track(x)
    if t is not None and off:
        t = t.moved({a: a + off for a in t.axes})
    return (1,) * off + tuple(shape), t


def broadcast(call: Call, ctx: Ctx):
    out_shape = ctx.out_shape()
    if out_shape is None:
        return None
    nd = len(out_shape)
    ops = [a for a in call.args if isinstance(a, (Node, ParamRef))]
    aligned = [(a, *_aligned(ctx, a, nd)) for a in ops]
    ref = None
    for _, shape, t in aligned:
        if t is None:
            continue
        if any(shape[a] == 1 and out_shape[a] > 1 for a in t.axes):
            ctx.freeze(t, "one-channel tensor broadcast over channels")
        else:
            ref = t if ref is None else join(ctx, ref, t)
    if ref is None:
        return None
    for a, shape, t in aligned:
        if t is None and any(shape[ax] > 1 for ax in ref.axes) and not _fixed_operand(ctx, a, shape, ref, nd):
            ctx.freeze(ref, f"combined with fixed-size tensor {getattr(a, 'name', a)} (not a parameter seen "
                            "through element-wise ops, nor a zeros/ones/full factory)")
        elif t is not None and not set(t.axes) & set(ref.axes) and any(shape[ax] > 1 for ax in ref.axes) \
                and not _fixed_operand(ctx, a, shape, ref, nd):
            # the other space of an outer product keeps its width; its tensor spans ref's axes at full size
            # (heads folded into rows, met by a gate with its own rows): those cannot follow either
            ctx.freeze(ref, f"combined with {getattr(a, 'name', a)}, whose channels lie on other axes and "
                            f"whose axes {ref.axes} keep their size")
    return ref


def join(ctx: Ctx, ref: Track, t: Track) -> Track:
    """Couple two operands' channels; returns the track the output carries.

    Channels on disjoint axes are two channel spaces meeting in an outer product (Mamba's selective scan:
    ``delta[:, :, :, None] * B[:, None, :, :]``, ``d_inner`` on axis 1, ``d_state`` on axis 3). A track holds
    one space (its labels are joint over its axes), so the larger space is carried on and the smaller one
    frozen, with a reason naming both."""
    if t.axes == ref.axes:
        ctx.couple(ref.labels, t.labels)
        return ref
    if set(t.axes) <= set(ref.axes) or set(ref.axes) <= set(t.axes):
        big, small = (ref, t) if set(t.axes) <= set(ref.axes) else (t, ref)
        ctx.couple(big.labels, broadcast_track(small, big))
        return big
    if set(t.axes) & set(ref.axes):
        why = f"operands carry channels on overlapping but different axes {t.axes} vs {ref.axes}"
        ctx.freeze(t, why)
        ctx.freeze(ref, why)
        return ref
    keep, drop = (t, ref) if t.labels.size > ref.labels.size else (ref, t)
    ctx.freeze(drop, f"outer product of two channel spaces ({drop.labels.size} channels on axes {drop.axes}, "
                     f"{keep.labels.size} on axes {keep.axes}): a tensor carries one channel space, the "
                     f"larger one follows and these {drop.labels.size} keep their width")
    return keep


def _fixed_operand(ctx: Ctx, a: Any, shape: tuple, ref: Track, nd: int) -> bool:
    """An untracked operand of full size along the (one) tracked axis follows the channels when it is a
    parameter read element-wise, a zero tensor or a factory (``fxadapt.ops.operands``)."""
    if len(ref.axes) != 1:
        return False
    axis = ref.axes[0] - (nd - len(operands.shape_of(ctx, a)))
    return (operands.param_axis_site(ctx, a, axis, ref.labels, PARAM_READS)
            or operands.zero_site(ctx, a, axis, ref.labels)
            or operands.factory_site(ctx, a, axis, ref.labels))


def broadcast_track(small: Track, big: Track) -> np.ndarray:
    """``small``'s labels broadcast over the axes of ``big`` (``small.axes`` is a subset)."""
    shape = [big.labels.shape[k] if a in small.axes else 1 for k, a in enumerate(big.axes)]
    return np.broadcast_to(small.labels.reshape(shape), big.labels.shape)


register(*SUMS, name="broadcast", kind="couples", channels=broadcast, sums=True)
register(*PRODUCTS, name="broadcast", kind="couples", channels=broadcast, zero="preserves")
register(*BINARY, name="broadcast", kind="couples", channels=broadcast)


REDUCE = aten_ops(
    "mean.dim", "sum.dim_IntList", "amax.default", "amin.default", "var.correction", "std.correction",
    "var.dim", "std.dim", "logsumexp.default", "prod.dim_int", "norm.ScalarOpt_dim", "argmax.default",
    "argmin.default", "all.dim", "any.dim",
)
REDUCE_PAIR = aten_ops("max.dim", "min.dim")  # (values, indices)


@rule(*REDUCE, kind="consumes")
def reduce(call: Call, ctx: Ctx):
    """Reducing a tracked axis consumes its channels (fewer summands, same shape); others pass through."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    nd = len(ctx.shape(x))
    dims = call.arg(1, "dim")
    keep = bool(call.arg(2, "keepdim", False))
    dims = list(range(nd)) if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    dims = sorted({norm_dim(d, nd) for d in dims})
    if t is not None and set(dims) & set(t.axes):
        # the reduction mixes channels: growing them is not function-preserving
        ctx.site("mix", t.labels, "mix")
    return reduced_track(ctx, t, dims, keep)


@rule(*REDUCE_PAIR, kind="consumes", name="reduce")
def reduce_pair(call: Call, ctx: Ctx):
    """``max.dim``/``min.dim``: values and indices both carry the reduced layout."""
    out = reduce(call, ctx)
    return (out, out)


def reduced_track(ctx: Ctx, t: Track | None, dims: list[int], keep: bool) -> Track | None:
    if t is None:
        return None
    remaining = [a for a in t.axes if a not in dims]
    if not remaining:
        return None
    lab = t.labels
    for a in sorted((a for a in t.axes if a in dims), reverse=True):
        k = t.axes.index(a)
        moved = np.moveaxis(lab, k, 0)
        ctx.couple(moved, moved[:1])
        lab = moved[0]
    shift = {a: a if keep else a - sum(d < a for d in dims) for a in remaining}
    return Track(tuple(shift[a] for a in remaining), lab)


POOL = aten_ops(
    "max_pool1d.default", "max_pool2d.default", "max_pool3d.default", "avg_pool1d.default",
    "avg_pool2d.default", "avg_pool3d.default", "adaptive_avg_pool1d.default", "adaptive_avg_pool2d.default",
    "adaptive_avg_pool3d.default", "lp_pool2d.default", "upsample_nearest1d.vec", "upsample_nearest2d.vec",
    "upsample_nearest3d.vec", "upsample_bilinear2d.vec", "upsample_bicubic2d.vec", "upsample_linear1d.vec",
    "upsample_trilinear3d.vec", "upsample_nearest2d.default", "upsample_bilinear2d.default",
    "_upsample_bilinear2d_aa.vec", "_upsample_nearest_exact2d.vec", "grid_sampler.default",
    "reflection_pad1d.default", "reflection_pad2d.default", "replication_pad2d.default",
)
POOL_TUPLE = aten_ops(
    "max_pool2d_with_indices.default", "adaptive_max_pool2d.default", "adaptive_max_pool1d.default",
    "max_pool3d_with_indices.default", "max_pool1d_with_indices.default",
)


def _spatial(ctx: Ctx, x, tail: int):
    t = ctx.track(x)
    if t is None:
        return None
    nd = len(ctx.shape(x))
    if any(a >= nd - tail for a in t.axes):
        return Blocked("pooling/resampling over an axis that carries channels")
    return t


@rule(*POOL, kind="passes", zero="preserves")
def pool(call: Call, ctx: Ctx):
    """Spatial op on the trailing (1-3) axes: labels on the leading axes pass through."""
    x = call.arg(0, "input")
    nd = len(ctx.shape(x))
    return _spatial(ctx, x, max(1, nd - 2))


@rule(*POOL_TUPLE, kind="passes", zero="preserves")
def pool_tuple(call: Call, ctx: Ctx):
    x = call.arg(0, "input")
    out = _spatial(ctx, x, max(1, len(ctx.shape(x)) - 2))
    return out if isinstance(out, Blocked) else (out, out)


@rule(*aten_ops("pad.default", "constant_pad_nd.default"), kind="passes", zero="preserves")
def pad(call: Call, ctx: Ctx):
    """Padding of untracked axes passes; padding the channel axis adds fixed channels, so it blocks."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is None:
        return None
    nd, pads = len(ctx.shape(x)), call.arg(1, "pad")
    padded = {nd - 1 - i // 2 for i, p in enumerate(pads) if p != 0}
    if padded & set(t.axes):
        return Blocked("zero-padding along the channel axis")
    return t


FACTORY = aten_ops(
    "zeros.default", "ones.default", "empty.memory_format", "full.default", "arange.default",
    "arange.start", "arange.start_step", "scalar_tensor.default", "randn.default", "rand.default",
    "tensor.default", "linspace.default", "eye.default", "new_zeros.default", "new_ones.default",
    "new_full.default", "new_empty.default",
)
NO_TENSOR = aten_ops(
    "sym_numel.default", "sym_stride.int", "sym_storage_offset.default",
    "_assert_tensor_metadata.default", "_assert_scalar.default", "sym_constrain_range.default",
    "sym_constrain_range_for_size.default", "_assert_async.msg", "_local_scalar_dense.default",
    "item.default", "dim.default", "numel.default", "_check_is_size.default",
)
SIZE_QUERY = aten_ops("sym_size.int", "size.int")


@rule(*FACTORY, *NO_TENSOR, kind="ignores", edit=edits.set_shape_entry)  # edit: an LSTM's zero state
def no_channels(call: Call, ctx: Ctx):
    """Factories and shape queries: no channels flow in or out."""
    return None


@rule(*SIZE_QUERY, kind="ignores", name="no_channels")
def size_query(call: Call, ctx: Ctx):
    """``x.size(d)``: reading the size of a channel axis as a number freezes it (a batch dim is fine)."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is not None and norm_dim(call.arg(1, "dim"), len(ctx.shape(x))) in t.axes:
        ctx.freeze(t, "channel count read as a number at run time")
    return None


@rule(*SYM_ARITH, kind="ignores")
def sym_arith(call: Call, ctx: Ctx):
    """Python arithmetic on symbolic sizes (``4 * batch``): export emits it only for ``SymInt`` values."""
    if any(ctx.track(a) is not None for a in call.args):
        return Blocked(f"{call.op.__name__} applied to a tensor that carries channels")
    return None


@rule(*aten_ops("tril.default", "triu.default"), kind="passes", zero="preserves")
def triangle(call: Call, ctx: Ctx):
    """``tril``/``triu`` keep a triangle of the last two axes (a causal mask within a chunk): channels on
    the other axes pass; on those two, which element survives depends on its position, so they freeze."""
    x = call.arg(0, "self")
    t, nd = ctx.track(x), len(ctx.shape(x))
    if t is not None and set(t.axes) & {nd - 2, nd - 1}:
        return Blocked(f"{call.op.__name__.split('.')[0]} keeps a triangle of the channel axes")
    return t
