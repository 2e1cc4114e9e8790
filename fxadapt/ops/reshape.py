"""Rules for ops that move the channel axis around: view/reshape, permute, squeeze, expand, pixel shuffle.

view/reshape: input and output dims are split into the minimal runs with equal products (numpy's reshape
grouping). The run holding the tracked axes is re-laid out by reshaping the label array (untracked dims
broadcast in), so a flatten ``[C, H, W] -> [C*H*W]`` gives every feature the label of its channel (a
``H*W`` multiplier) and a channel shuffle ``[C] -> [g, C/g] -> transpose -> [C]`` permutes labels exactly.
When a channel axis is split into several axes (``[C] -> [g, C/g]``, attention heads ``[H, D]``), labels
are unioned along every split axis but the innermost, so any kept subset is a product set and the view
stays valid: channel shuffles keep ``g``.

Attention heads (whether a split keeps whole heads or ``head_dim`` units): ``fxadapt.ops.heads``.
"""

from __future__ import annotations

import numpy as np

from fxadapt.ir.channels import Track
from fxadapt.ops import edits
from fxadapt.ops.core import Blocked, Call, Ctx, aten_ops, norm_dim, rule
from fxadapt.ops.heads import ATTENTION_MODES, DEFAULT_ATTENTION, heads_split  # noqa: F401  (re-exported)


def _runs(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]]:
    """Split the dims of two shapes of equal numel into minimal runs of equal product."""
    runs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        ri, rj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                ri.append(i)
                pa *= a[i]
                i += 1
            else:
                rj.append(j)
                pb *= b[j]
                j += 1
        runs.append((ri, rj))
    if runs:
        runs[-1][0].extend(range(i, len(a)))
        runs[-1][1].extend(range(j, len(b)))
    return runs


def relayout(ctx: Ctx, t: Track, in_shape: tuple, out_shape: tuple,
             heads: bool = False) -> Track | Blocked | None:
    """Labels of a tensor of ``in_shape`` after ``reshape(out_shape)``.

    The runs from the first to the last one holding a tracked axis form one contiguous span of dims, so
    broadcasting the labels over the span's input dims and reshaping to its output dims is exact. When the
    channel axis is split into several axes, the innermost one stays tracked, or with ``heads`` the one
    before it (the head axis of ``[.., H, D]``); labels are unioned along all the others.
    """
    try:
        runs = _runs(tuple(in_shape), tuple(out_shape))
    except IndexError:
        return Blocked(f"cannot relate shapes {tuple(in_shape)} and {tuple(out_shape)}")
    hit = [k for k, r in enumerate(runs) if set(r[0]) & set(t.axes)]
    if not hit:
        return Blocked(f"cannot relate shapes {tuple(in_shape)} and {tuple(out_shape)}")
    ins = [d for r in runs[hit[0]:hit[-1] + 1] for d in r[0]]
    outs = [d for r in runs[hit[0]:hit[-1] + 1] for d in r[1]]
    full = t.labels.reshape([in_shape[a] if a in t.axes else 1 for a in ins])
    full = np.broadcast_to(full, [in_shape[a] for a in ins]).reshape([out_shape[a] for a in outs])
    keep = [k for k in range(full.ndim) if not _constant_along(full, k)]
    if not keep:
        ctx.freeze(t, "reshape collapses the channel axis to one position")
        return None
    lab = full[tuple(slice(None) if k in keep else 0 for k in range(full.ndim))]
    if len(keep) > 1:
        # the other split axes now hold the kept axis' labels at every position: they carry no channels
        # of their own (a reduction over the innermost axis must not union its channels)
        at = len(keep) - (2 if heads else 1)
        moved = np.moveaxis(lab, at, -1)
        flat = moved.reshape(-1, moved.shape[-1])
        ctx.couple(flat, flat[:1])
        keep, lab = [keep[at]], flat[0]
    return Track(tuple(outs[k] for k in keep), np.ascontiguousarray(lab))


def _constant_along(a: np.ndarray, k: int) -> bool:
    return bool(np.all(a == a.take([0], axis=k)))


def _shape_sites(ctx: Ctx, t: Track, sizes) -> None:
    """Int entries of a shape list at tracked axes change with the channel count: record them. An entry
    computed at run time (a symbolic size: the channel count multiplied into the batch, as patch unfolding
    does) cannot be rewritten: those channels are frozen."""
    if t is None or isinstance(t, Blocked):
        return
    if any(a < len(sizes) and not isinstance(sizes[a], int) for a in t.axes):
        ctx.freeze(t, "the channel count enters a size computed at run time (merged with another axis)")
        return
    for k, a in enumerate(t.axes):
        if a < len(sizes) and isinstance(sizes[a], int) and sizes[a] != -1 and k == len(t.axes) - 1:
            idx: list[int | slice] = [0] * t.labels.ndim
            idx[k] = slice(None)
            ctx.site("shape_arg", t.labels[tuple(idx)], "shape", arg=1, index=a)


def _relaid(call: Call, ctx: Ctx):
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is None:
        return None
    return relayout(ctx, t, ctx.shape(x), ctx.out_shape(), heads_split(call, ctx))


@rule(*aten_ops("view.default", "reshape.default", "_unsafe_view.default", "view_copy.default"),
      kind="reindexes", zero="preserves", edit=edits.set_shape_entry)
def view(call: Call, ctx: Ctx):
    """A view to an explicit shape list: its entry at the channel axis is a site (it follows the width)."""
    out = _relaid(call, ctx)
    if isinstance(out, Track):
        _shape_sites(ctx, out, call.arg(1, "size"))
    return out


@rule(*aten_ops("flatten.using_ints"), kind="reindexes", zero="preserves", name="view")
def flatten(call: Call, ctx: Ctx):
    return _relaid(call, ctx)


@rule(*aten_ops("unflatten.int"), kind="reindexes", zero="preserves", name="view", edit=edits.set_shape_entry)
def unflatten(call: Call, ctx: Ctx):
    """``unflatten(x, dim, sizes)``: ``sizes`` (argument 2) start at ``dim``."""
    x = call.arg(0, "self")
    out = _relaid(call, ctx)
    if isinstance(out, Track):
        dim, sizes = norm_dim(call.arg(1, "dim"), len(ctx.shape(x))), call.arg(2, "sizes")
        a = out.axes[-1] - dim
        if 0 <= a < len(sizes) and isinstance(sizes[a], int) and sizes[a] != -1:
            lab = np.moveaxis(out.labels, -1, 0).reshape(out.labels.shape[-1], -1)[:, 0]
            ctx.site("shape_arg", lab, "shape", arg=2, index=a)
    return out


@rule(*aten_ops("squeeze.dim", "squeeze.dims", "squeeze.default", "unsqueeze.default", "squeeze_.dim",
                "unsqueeze_.default"), kind="reindexes", zero="preserves")
def squeeze(call: Call, ctx: Ctx):
    return _relaid(call, ctx)


def _permuted(call: Call, ctx: Ctx, perm_of) -> Track | None:
    """Labels follow the axes: ``perm_of(nd)`` lists, for every output axis, the input axis it reads."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is None:
        return None
    perm = perm_of(len(ctx.shape(x)))
    return t.moved({old: new for new, old in enumerate(perm)})


@rule(*aten_ops("permute.default", "permute_copy.default"), kind="reindexes", zero="preserves")
def permute(call: Call, ctx: Ctx):
    return _permuted(call, ctx, lambda nd: [norm_dim(d, nd) for d in call.arg(1, "dims")])


@rule(*aten_ops("transpose.int", "swapaxes.default", "transpose_copy.int"), kind="reindexes",
      zero="preserves", name="permute")
def transpose(call: Call, ctx: Ctx):
    def perm(nd):
        p, i, j = list(range(nd)), norm_dim(call.arg(1, "dim0"), nd), norm_dim(call.arg(2, "dim1"), nd)
        p[i], p[j] = p[j], p[i]
        return p

    return _permuted(call, ctx, perm)


@rule(*aten_ops("movedim.int"), kind="reindexes", zero="preserves", name="permute")
def movedim(call: Call, ctx: Ctx):
    def perm(nd):
        p, s, d = list(range(nd)), norm_dim(call.arg(1, "source"), nd), \
                norm_dim(call.arg(2, "destination"), nd)
        p.remove(s)
        p.insert(d, s)
        return p

    return _permuted(call, ctx, perm)


@rule(*aten_ops("t.default", "numpy_T.default"), kind="reindexes", zero="preserves", name="permute")
def reverse_axes(call: Call, ctx: Ctx):
    return _permuted(call, ctx, lambda nd: list(range(nd))[::-1])


@rule(*aten_ops("expand.default", "expand_as.default", "expand_copy.default"), kind="reindexes",
      zero="preserves", edit=edits.set_shape_entry)
def expand(call: Call, ctx: Ctx):
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is None:
        return None
    off = len(ctx.out_shape()) - len(ctx.shape(x))
    out = t.moved({a: a + off for a in t.axes}) if off else t
    sizes = call.arg(1, "size")
    if isinstance(sizes, (list, tuple)):
        _shape_sites(ctx, out, sizes)
    return out


@rule(*aten_ops("view_as_complex.default"), kind="reindexes", zero="preserves")
def view_as_complex(call: Call, ctx: Ctx):
    """``[..., n, 2]`` real -> ``[..., n]`` complex (rotary as a complex product): channels on the other
    axes pass; the pair axis is the number's real and imaginary part."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is not None and len(ctx.shape(x)) - 1 in t.axes:
        return Blocked("view_as_complex pairs the channel axis into complex numbers")
    return t


@rule(*aten_ops("view_as_real.default"), kind="reindexes", zero="preserves")
def view_as_real(call: Call, ctx: Ctx):
    """``[..., n]`` complex -> ``[..., n, 2]`` real: every axis keeps its place, a pair axis is added."""
    return ctx.track(call.arg(0, "self"))


@rule(*aten_ops("pixel_shuffle.default"), kind="reindexes", zero="preserves")
def pixel_shuffle(call: Call, ctx: Ctx):
    """``[C*r^2, H, W] -> [C, H*r, W*r]``: the r^2 sub-channels of a channel are unioned (granularity r^2)."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is None:
        return None
    nd = len(ctx.shape(x))
    if t.axes != (nd - 3,):
        return Blocked("pixel_shuffle with channels on an unexpected axis")
    r2 = call.arg(1, "upscale_factor") ** 2
    blocks = t.labels.reshape(-1, r2)
    ctx.couple(blocks, blocks[:, :1])
    return Track(t.axes, blocks[:, 0].copy())


@rule(*aten_ops("pixel_unshuffle.default"), kind="reindexes", zero="preserves")
def pixel_unshuffle(call: Call, ctx: Ctx):
    """``[C, H, W] -> [C*r^2, H/r, W/r]``: every channel becomes r^2 consecutive channels (same label)."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is None:
        return None
    if t.axes != (len(ctx.shape(x)) - 3,):
        return Blocked("pixel_unshuffle with channels on an unexpected axis")
    return Track(t.axes, np.repeat(t.labels, call.arg(1, "downscale_factor") ** 2))


@rule(*aten_ops("channel_shuffle.default", "native_channel_shuffle.default"), kind="reindexes",
      zero="preserves")
def channel_shuffle(call: Call, ctx: Ctx):
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is None:
        return None
    if t.axes != (1,):
        return Blocked("channel_shuffle with channels on an unexpected axis")
    g = call.arg(1, "groups")
    blocks = t.labels.reshape(g, -1)
    ctx.couple(blocks, blocks[:1])
    return Track((1,), blocks.T.reshape(-1).copy())


def _reindexed(call: Call, ctx: Ctx, dims_of) -> Track | Blocked | None:
    """An op that re-indexes or repeats the axes ``dims_of(nd)``: fine on untracked axes, blocking on
    channels."""
    x = call.arg(0, "self")
    t = ctx.track(x)
    if t is None:
        return None
    dims = dims_of(len(ctx.shape(x)))
    if dims is not None and not set(dims) & set(t.axes):
        return t
    return Blocked(f"{getattr(call.op, '_opname', call.op)} re-indexes the channel axis")


@rule(*aten_ops("index_select.default", "gather.default", "take_along_dim.default"), kind="reindexes",
      name="gather_like")
def gather(call: Call, ctx: Ctx):
    dim = call.arg(1, "dim")
    return _reindexed(call, ctx, lambda nd: [norm_dim(dim, nd)] if isinstance(dim, int) else None)


@rule(*aten_ops("flip.default"), kind="reindexes", name="gather_like", zero="preserves")
def flip(call: Call, ctx: Ctx):
    return _reindexed(call, ctx, lambda nd: [norm_dim(d, nd) for d in call.arg(1, "dims") or []])


@rule(*aten_ops("roll.default"), kind="reindexes", name="gather_like", zero="preserves")
def roll(call: Call, ctx: Ctx):
    dims = call.arg(2, "dims")
    return _reindexed(call, ctx, lambda nd: [norm_dim(d, nd) for d in dims] if dims else None)


@rule(*aten_ops("repeat.default", "tile.default"), kind="reindexes", name="gather_like", zero="preserves")
def repeat(call: Call, ctx: Ctx):
    """Repeating along axes with a factor other than 1 (the output keeps the input's rank)."""
    reps = list(call.arg(1, "repeats"))

    def dims(nd):
        if len(ctx.out_shape()) != nd:
            return None
        return [a for a in range(nd) if a >= nd - len(reps) and reps[a - (nd - len(reps))] != 1]

    return _reindexed(call, ctx, dims)
