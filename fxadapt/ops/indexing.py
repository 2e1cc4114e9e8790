"""Rules for ops that concatenate, split or slice tensors, and for matrix products.

cat along the channel axis concatenates label arrays (one group can then be a slice of a concatenation);
split/chunk hand each output its slice of labels and record a ``split`` site, so materialization can
rewrite the sizes (an equal ``chunk`` becomes ``split_with_sizes`` when the halves shrink differently);
slice with step 1 records a ``slice`` site whose bounds become kept-channel counts. ``unbind``/``select``
on the channel axis make positions meaningful, so those channels freeze. Along untracked axes all operands
must carry the same channels, and are coupled.

Matrix products ``a[..., n, k] @ b[..., k, m]``: the contracted ``k`` labels of both operands are
coupled (a parameter operand is sliced instead); batch axes are coupled; ``n`` (from ``a``) or ``m`` (from
``b``) flows to the output. A parameter ``b`` makes ``m`` a new channel space, like ``linear``; a
parameter ``a`` (``W[n, k] @ x[..., k, m]``: Mamba's ``dt_proj.weight @ time_step``) makes ``n`` one; a
parameter with batch axes (``bmm(x[E, T, k], W[E, k, n])``: Llama 4's experts) is sliced on its last two.
A zero operand (``k @ S`` with ``S = zeros(..)``, ``fxadapt.ops.operands``) has its factory entries follow
the contracted channels and, once coupled, gives the output's rows/columns. Two spaces on disjoint output
axes (``k^T @ v``: a ``d_k x d_v`` state) keep the larger and freeze the smaller, unless the product is
thrown away (``fxadapt.ops.core.unused``: a one-chunk scan's final state). ``addmm``/``baddbmm`` add a
bias: it follows the product's channels (a parameter, also through views) or they are frozen.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
from torch.fx import Node

from fxadapt.ir.channels import ParamRef, Track
from fxadapt.ops import costs, edits, operands
from fxadapt.ops.core import Blocked, Call, Ctx, aten_ops, axis_labels, norm_dim, only_axis, rule, unused
from fxadapt.ops.pointwise import PARAM_READS, broadcast_track, join, reduced_track
from fxadapt.ops.registry import op_of


def _align_all(ctx: Ctx, tracks: list[Track | None], what: str) -> Track | None:
    """Couple tensors that must carry the same channels on the same axes; return the reference."""
    ref = next((t for t in tracks if t is not None), None)
    if ref is None:
        return None
    for t in tracks:
        if t is None:
            ctx.freeze(ref, f"{what} with a fixed-size tensor")
        elif t.axes == ref.axes and t.labels.shape == ref.labels.shape:
            ctx.couple(ref.labels, t.labels)
        else:
            ctx.freeze(t, f"{what} of tensors with channels on different axes")
            ctx.freeze(ref, f"{what} of tensors with channels on different axes")
    return ref


@rule(*aten_ops("cat.default", "concat.default", "concatenate.default"), kind="reindexes", zero="preserves")
def cat(call: Call, ctx: Ctx):
    xs = [x for x in call.arg(0, "tensors") if ctx.shape(x) and len(ctx.shape(x)) == len(ctx.out_shape())]
    dim = norm_dim(call.arg(1, "dim", 0), len(ctx.out_shape()))
    tracks = [ctx.track(x) for x in xs]
    if not any(t is not None and dim in t.axes for t in tracks):
        return _align_all(ctx, _per_channel_params(ctx, xs, _param_tokens(ctx, xs, tracks)), "concatenation")
    parts = []
    for x, t in zip(xs, tracks):
        if t is not None and t.axes == (dim,):
            parts.append(t.labels)
            continue
        ctx.freeze(t, "concatenated along channels with a different channel layout")
        lab = ctx.new(ctx.shape(x)[dim])
        ctx.freeze(lab, f"channels concatenated from fixed-size tensor {getattr(x, 'name', x)}")
        parts.append(lab)
    return Track((dim,), np.concatenate(parts))


_BROADCASTS = aten_ops("expand.default", "clone.default", "_to_copy.default", "to.dtype")


def _param_tokens(ctx: Ctx, xs, tracks):
    """A parameter broadcast to the batch and concatenated along the sequence (ViT's CLS token,
    ``cls.expand(B, -1, -1)``) carries the channels of its last axis: it is sliced with them (``const``)."""
    ref = next((t for t in tracks if t is not None), None)
    if ref is None or len(ref.axes) != 1 or ref.axes[0] != len(ctx.out_shape()) - 1:
        return tracks
    out = list(tracks)
    for i, (x, t) in enumerate(zip(xs, tracks)):
        src = x
        while t is None and isinstance(src, Node) and src.op != "get_attr" and op_of(src) in _BROADCASTS:
            src = src.args[0]
        if t is None and isinstance(src, Node) and src.op == "get_attr" \
                and ctx.shape(ParamRef(src.target)) and \
                ctx.shape(ParamRef(src.target))[-1] == ref.labels.shape[0]:
            lab = ctx.new(ref.labels.shape[0])
            ctx.param_site(ParamRef(src.target), len(ctx.shape(ParamRef(src.target))) - 1, lab, "const")
            out[i] = Track(ref.axes, lab)
    return out


_VIEWS = aten_ops("view.default", "reshape.default", "_unsafe_view.default")


def _per_channel_params(ctx: Ctx, xs, tracks):
    """A 1-D parameter with one value per channel, viewed onto the channel axis and broadcast
    (gpt-oss's attention sinks ``sinks.reshape(1, -1, 1, 1).expand(B, -1, L, -1)``, concatenated to the scores
    along the keys): it is sliced with the channels (``const``)."""
    ref = next((t for t in tracks if t is not None), None)
    if ref is None or len(ref.axes) != 1:
        return tracks
    axis, n = ref.axes[0], ref.labels.shape[0]
    out = list(tracks)
    for i, (x, t) in enumerate(zip(xs, tracks)):
        src = x
        while t is None and isinstance(src, Node) and op_of(src) in (*_BROADCASTS, *_VIEWS):
            shape = ctx.shape(src)
            if len(shape) != len(ctx.out_shape()) or shape[axis] != n or \
                    (op_of(src) in _VIEWS and math.prod(shape) != n):
                break
            src = src.args[0]
        else:
            if t is None and isinstance(src, Node) and src.op == "get_attr" \
                    and ctx.shape(ParamRef(src.target)) == (n,):
                lab = ctx.new(n)
                ctx.param_site(ParamRef(src.target), 0, lab, "const")
                out[i] = Track(ref.axes, lab)
    return out


@rule(*aten_ops("stack.default"), kind="reindexes", zero="preserves")
def stack(call: Call, ctx: Ctx):
    xs = list(call.arg(0, "tensors"))
    dim = norm_dim(call.arg(1, "dim", 0), len(ctx.out_shape()))
    tracks = [ctx.track(x) for x in xs]
    tracks = [None if t is None else t.moved({a: a + (a >= dim) for a in t.axes}) for t in tracks]
    return _align_all(ctx, tracks, "stack")


def _out_shapes(ctx: Ctx) -> list[tuple]:
    shapes = ctx.out_shape()
    return list(shapes) if shapes and isinstance(shapes[0], tuple) else [shapes]


@rule(*aten_ops("split.Tensor", "split_with_sizes.default", "chunk.default", "tensor_split.sections",
                "tensor_split.indices",
                "split_with_sizes_copy.default", "unsafe_split.Tensor", "unsafe_chunk.default"),
                kind="reindexes",
      zero="preserves", edit=edits.resplit)
def split(call: Call, ctx: Ctx):
    x = call.arg(0, "self")
    t = ctx.track(x)
    shapes = _out_shapes(ctx)
    dim = norm_dim(call.arg(2, "dim", 0), len(ctx.shape(x)))
    if t is None or dim not in t.axes:
        return tuple(t for _ in shapes)
    if t.axes != (dim,):
        return Blocked("split of a multi-axis channel layout")
    bounds = np.cumsum([0] + [s[dim] for s in shapes])
    ctx.site("split", t.labels, "split", arg=dim)
    for i in range(len(shapes)):  # units of different pieces form different groups: no piece can empty
        ctx.site("piece", t.labels[bounds[i]:bounds[i + 1]], "piece", arg=dim, index=i)
    return tuple(Track((dim,), t.labels[bounds[i]:bounds[i + 1]]) for i in range(len(shapes)))


@rule(*aten_ops("unbind.int"), kind="reindexes", zero="preserves")
def unbind(call: Call, ctx: Ctx):
    x = call.arg(0, "self")
    t = ctx.track(x)
    dim = norm_dim(call.arg(1, "dim", 0), len(ctx.shape(x)))
    n = ctx.shape(x)[dim]
    if t is not None and dim in t.axes:
        ctx.freeze(t, "unbind along the channel axis makes every channel a separate output")
        return tuple(None for _ in range(n))
    out = None if t is None else t.moved({a: a - (a > dim) for a in t.axes})
    return tuple(out for _ in range(n))


def _sliced(call: Call, ctx: Ctx, bounds):
    """``bounds() -> (start, end, step)`` of a slice along ``dim`` (argument 1)."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    nd = len(ctx.shape(x))
    dim = norm_dim(call.arg(1, "dim", 0), nd)
    if t is None or dim not in t.axes:
        return t
    if t.axes != (dim,):
        return Blocked("slice of a multi-axis channel layout")
    start, end, step = bounds()
    if not all(isinstance(v, (int, type(None))) for v in (start, end, step)):
        return Blocked("slice bounds computed at run time on the channel axis")
    if step not in (1, None):
        return _strided(ctx, t, dim, ctx.shape(x)[dim], start, end, step)
    lo, hi, _ = slice(start, end).indices(ctx.shape(x)[dim])
    if (lo, hi) != (0, ctx.shape(x)[dim]):
        ctx.site("slice", t.labels, "slice", arg=lo, index=hi)
        ctx.site("piece", t.labels[lo:hi], "piece", arg=dim)  # the kept run is a group of its own
    return Track((dim,), t.labels[lo:hi])


def _strided(ctx: Ctx, t, dim: int, n: int, start, end, step: int):
    """``x[..., r::s]`` over the whole axis (gpt-oss's interleaved gate/up ``[..., ::2]``, ``[..., 1::2]``):
    every run of ``s`` consecutive positions is one unit (kept or dropped together), so the kept tensor keeps
    its interleave and the same slice of it picks the kept channels. Other strided slices block."""
    lo, hi, _ = slice(start, end).indices(n)
    if not (0 <= lo < step and hi == n and n % step == 0):
        return Blocked(f"strided slice (step {step}) of the channel axis")
    runs = t.labels.reshape(-1, step)
    ctx.couple(runs, runs[:, :1])
    return Track((dim,), np.ascontiguousarray(t.labels[lo::step]))


@rule(*aten_ops("slice.Tensor", "slice_copy.Tensor"), kind="reindexes", zero="preserves", edit=edits.reslice)
def slice_(call: Call, ctx: Ctx):
    return _sliced(call, ctx, lambda: (call.arg(2, "start"), call.arg(3, "end"), call.arg(4, "step", 1)))


@rule(*aten_ops("narrow.default"), kind="reindexes", zero="preserves", name="slice_", edit=edits.renarrow)
def narrow(call: Call, ctx: Ctx):
    start, length = call.arg(2, "start"), call.arg(3, "length")
    end = start + length if isinstance(start, int) and isinstance(length, int) else length
    return _sliced(call, ctx, lambda: (start, end, 1))


@rule(*aten_ops("select.int", "select_copy.int"), kind="reindexes", zero="preserves")
def select(call: Call, ctx: Ctx):
    x = call.arg(0, "self")
    t = ctx.track(x)
    dim = norm_dim(call.arg(1, "dim"), len(ctx.shape(x)))
    if t is None:
        return None
    if dim in t.axes:
        ctx.freeze(t, "select picks one channel position by index")
        return None
    return t.moved({a: a - (a > dim) for a in t.axes})


@rule(operator.getitem, kind="reindexes", zero="preserves")
def getitem(call: Call, ctx: Ctx):
    src, idx = call.args[0], call.args[1]
    tracks = ctx.tracks.get(src.name) if isinstance(src, Node) else None
    if isinstance(tracks, tuple) and isinstance(idx, int) and idx < len(tracks):
        return tracks[idx]
    return None


TRANSPOSE_DIMS = aten_ops("transpose.int")
TRANSPOSES = aten_ops("t.default", "numpy_T.default") + TRANSPOSE_DIMS


def _weight(ctx: Ctx, b, sb: tuple) -> tuple[ParamRef, int, int] | None:
    """The right operand as a 2-D weight: ``(param, contracted axis, column axis)`` of the parameter itself
    (``x @ W``), or of the parameter a transpose reads (``x @ W.T``: FalconLinear, hand-written layers)."""
    if isinstance(b, ParamRef):   # [K, N], or one [K, N] per batch entry ([E, K, N]: Llama 4's experts)
        return (b, len(sb) - 2, len(sb) - 1) if len(sb) >= 2 else None
    if len(sb) != 2 or not isinstance(b, Node) or b.target not in TRANSPOSES or not b.args:
        return None
    src = b.args[0]
    if not (isinstance(src, Node) and src.op == "get_attr") \
            or len(ctx.shape(ParamRef(str(src.target))) or ()) != 2:
        return None
    if b.target in TRANSPOSE_DIMS and {norm_dim(d, 2) for d in b.args[1:3]} != {0, 1}:
        return None
    return ParamRef(str(src.target)), 1, 0


def _matmul(ctx: Ctx, a: Any, b: Any, out_nd: int):   # operands: nodes or parameters
    sa, sb = ctx.shape(a), ctx.shape(b)
    if len(sa) < 2 or len(sb) < 2:
        return Blocked("matrix product with a 1-D operand")
    ta, tb = ctx.track(a), ctx.track(b)
    ka, kb = len(sa) - 1, len(sb) - 2
    la = only_axis(ctx, ta, ka, "a matmul contraction") if ta is not None and ka in ta.axes else None
    lb = only_axis(ctx, tb, kb, "a matmul contraction") if tb is not None and kb in tb.axes else None
    weight = _weight(ctx, b, sb) if tb is None else None
    left = _weight(ctx, a, sa) if ta is None and weight is None else None  # W @ x: (param, out axis, in axis)
    if la is not None and lb is not None:
        ctx.couple(la, lb)
        ctx.site("mix", la, "mix")
    elif la is not None and weight is not None:
        ctx.param_site(weight[0], weight[1], la, "in")
    elif lb is not None and left is not None:
        ctx.param_site(left[0], left[2], lb, "in")
    elif (la is not None and operands.zero_site(ctx, b, kb, la)
          or lb is not None and operands.zero_site(ctx, a, ka, lb)):
        pass   # contracted with a zero tensor: its size follows (fxadapt.ops.operands)
    elif la is not None or lb is not None:
        other = b if la is not None else a
        ctx.freeze(la if la is not None else lb, f"contracted with {getattr(other, 'name', other)}, whose "
                                                 "contracted axis carries no channels (a fixed size)")
    rest_a = reduced_track(ctx, ta, [ka], keep=True) if ta is not None else None
    rest_b = reduced_track(ctx, tb, [kb], keep=True) if tb is not None else None
    outs = []
    for rest, nd, other, t_other in ((rest_a, len(sa), b, tb), (rest_b, len(sb), a, ta)):
        if rest is not None:
            outs.append(rest.moved({x: x + out_nd - nd for x in rest.axes}))
            _fixed_batch(ctx, outs[-1], other, t_other, out_nd)
    outs += _zero_sides(ctx, a, b, ta, tb, out_nd)
    for w, n, axis in ((weight, sb[-1], out_nd - 1), (left, sa[-2], out_nd - 2)):
        if w is not None:
            new = ctx.new(n)
            ctx.param_site(w[0], w[2] if w is weight else w[1], new, "out")
            if not outs:
                return Track((axis,), new)
            ctx.freeze(new, "matmul output rows/columns beside tracked channels")
    if len(outs) > 1 and outs[0].axes != outs[1].axes and set(outs[0].axes) <= set(outs[1].axes):
        # attn @ v: batch/head axes of both operands carry the same channels, v adds its columns
        small, big = outs
        ctx.couple(big.labels, broadcast_track(small, big))
        return big
    if len(outs) == 2 and not set(outs[0].axes) & set(outs[1].axes):
        # an outer product of two channel spaces: the larger follows, the smaller keeps its width unless
        # the product is thrown away (both sizes then only have to agree with the zero state it is added to)
        big = max(outs, key=lambda t: t.labels.size)
        return big if unused(ctx.node) else join(ctx, outs[0], outs[1])
    return _align_all(ctx, outs, "matrix product") if len(outs) > 1 else (outs[0] if outs else None)


def _zero_sides(ctx: Ctx, a: Any, b: Any, ta: Track | None, tb: Track | None, out_nd: int) -> list[Track]:
    """The output rows of a zero left operand or columns of a zero right one, where channels were coupled
    with the zero tensor's factory entry before (``fxadapt.ops.operands.zero_axis_labels``)."""
    out = []
    for x, t, axis, own in ((a, ta, out_nd - 2, -2), (b, tb, out_nd - 1, -1)):
        labels = operands.zero_axis_labels(ctx, x, len(ctx.shape(x)) + own) if t is None else None
        if labels is not None:
            out.append(Track((axis,), labels))
    return out


def _fixed_batch(ctx: Ctx, out: Track, operand: Any, t_other: Track | None, out_nd: int) -> None:
    """Freeze channels one operand carries on a batch axis (any axis but the last two) where the other
    operand has the same axis at a size above one but carries no channels there: the two batch axes are
    paired element by element (``bmm(attn_probs, v)`` with heads merged into the batch axis, the probs'
    heads frozen upstream), so slicing one side alone leaves the batch sizes unequal — unless the other
    operand is a zero tensor, whose size there follows (``fxadapt.ops.operands``)."""
    other = ctx.shape(operand)
    off = out_nd - len(other)
    fixed = [o for o in out.axes if o < out_nd - 2 and 0 <= o - off < len(other) - 2 and other[o - off] > 1
             and (t_other is None or o - off not in t_other.axes)]
    fixed = [o for o in fixed if not (t_other is None and len(out.axes) == 1
                                      and operands.zero_site(ctx, operand, o - off, out.labels))]
    if fixed:
        ctx.freeze(out,
                   f"matmul batch axis {fixed[0]} paired with an operand of fixed size "
                   f"{other[fixed[0] - off]}")


@rule(*aten_ops("matmul.default", "mm.default", "bmm.default"), kind="couples", cost=costs.matmul_macs,
      zero="preserves")
def matmul(call: Call, ctx: Ctx):
    return _matmul(ctx, call.arg(0, "self"), call.arg(1, "other"), len(ctx.out_shape()))


@rule(*aten_ops("addmm.default", "baddbmm.default"), kind="couples", cost=costs.addmm_macs)
def addmm(call: Call, ctx: Ctx):
    out = _matmul(ctx, call.arg(1, "mat1"), call.arg(2, "mat2"), len(ctx.out_shape()))
    return out if isinstance(out, Blocked) else _with_bias(ctx, call.arg(0, "self"), out)


def _with_bias(ctx: Ctx, bias: Any, out: Track | None) -> Track | None:
    """``bias + mat1 @ mat2`` is a broadcast sum: a tracked bias is joined with the product's channels
    (``fxadapt.ops.pointwise.join``); an untracked one of full size along the product's channel axis must
    follow them — a parameter (``addmm(b, x, W)``, or read through views: RecurrentGemma's
    ``baddbmm(b[:, None, :], x, W)`` with one ``W`` per head), a zero tensor or a factory — or the channels
    are frozen; a tracked bias added to a product without channels is frozen."""
    nd = len(ctx.out_shape())
    shape = operands.shape_of(ctx, bias)
    off = nd - len(shape)
    t = ctx.track(bias)
    t = t.moved({a: a + off for a in t.axes}) if t is not None and off else t
    if t is not None and out is None:
        ctx.freeze(t, "bias added to a matrix product whose size is fixed")
        return None
    if out is None or t is not None:
        return out if t is None else join(ctx, out, t)
    wide = [o for o in out.axes if o >= off and shape[o - off] > 1]
    if not wide:
        return out
    axis = wide[0] - off
    if len(wide) == 1 and isinstance(bias, ParamRef):
        ctx.param_site(bias, axis, axis_labels(ctx, out, wide[0]), "bias")
    elif not (len(out.axes) == 1 and (operands.param_axis_site(ctx, bias, axis, out.labels, PARAM_READS)
                                      or operands.zero_site(ctx, bias, axis, out.labels)
                                      or operands.factory_site(ctx, bias, axis, out.labels))):
        ctx.freeze(out, f"matrix product added to {getattr(bias, 'name', bias)}, of fixed size {shape[axis]} "
                        "along its channels (not a parameter seen through element-wise ops or views)")
    return out
