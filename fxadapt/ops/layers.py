"""Rules for parametric ops: convolutions, linear, embedding and the normalisations.

Convolution, weight ``W[O, I/g, k...]`` (transposed: ``W[I, O/g, k...]``):
- ``groups == 1``: output channels are new labels (sites: ``W`` out axis, bias); input labels index ``W``'s in
  axis.
- depthwise (``groups == C_in``, multiplier ``m = C_out / C_in``): output channel ``o`` is computed from
  input channel ``o // m`` only, so the output carries the input's labels repeated ``m`` times (a
  pass-through); ``groups`` follows the number of kept input channels.
- grouped (``1 < groups < C_in``): channels are viewed as ``[groups, C/groups]`` and the labels of one
  intra-group position are unioned across groups, so every kept position is kept in every group and
  ``groups`` stays fixed (granularity = ``groups``).

A bias is sliced with the output channels when it is a parameter; a bias computed at run time
(``F.multi_head_attention_forward`` chunks ``cat(q_bias, k_bias, v_bias)``) follows them only when it carries
their channel labels, otherwise the output channels are frozen (its size cannot change with them).
"""

from __future__ import annotations

import numpy as np
from torch.fx import Node

from fxadapt.ir.channels import ParamRef, Track
from fxadapt.ops import costs, edits, lifts, wstd
from fxadapt.ops import latency_keys as keys
from fxadapt.ops.core import Blocked, Call, Ctx, aten_ops, norm_dim, only_axis, param_behind_squeezes, rule
from fxadapt.ops.norm_params import norm_param_site
from fxadapt.ops.registry import Lift


def _grouped(ctx: Ctx, labels: np.ndarray, groups: int) -> np.ndarray:
    """Union labels of the same intra-group position across ``groups`` equal blocks; return one block."""
    blocks = labels.reshape(groups, -1)
    ctx.couple(blocks, blocks[:1])
    return blocks[0]


def _bias_site(ctx: Ctx, b, out: np.ndarray, what: str) -> None:
    """The bias ``b`` of a layer whose output channels are ``out`` (see the module docstring)."""
    if not isinstance(b, Node):
        ctx.param_site(b, 0, out, "bias")
        return
    t = ctx.track(b)
    if t is not None and t.axes == (0,) and t.labels.shape == out.shape:
        ctx.couple(t.labels, out)
        return
    ctx.freeze(out, f"{what} bias is computed at run time ({b.name}) and does not follow its output channels")
    ctx.freeze(t, f"{what} bias is computed at run time ({b.name}) and does not follow its output channels")


def _conv(call: Call, ctx: Ctx, w_axes: tuple[int, int], groups: int, groups_arg: int = 6):
    """Shared conv logic; ``w_axes`` = (weight axis of output channels, weight axis of input channels);
    ``groups_arg``: the argument position of ``groups`` (rewritten when a depthwise conv is sliced)."""
    x, w, b = call.arg(0, "input"), param_behind_squeezes(call.arg(1, "weight"), ctx.shape), \
            call.arg(2, "bias")
    out_ax, in_ax = w_axes
    std = wstd.standardised(w, ctx.shape, out_ax)
    if isinstance(std, wstd.Standardised):
        w = std.param
    if not isinstance(w, ParamRef):
        return _computed_weight(ctx, call, std)
    cin, cout = ctx.shape(x)[1], ctx.out_shape()[1]
    tin = only_axis(ctx, ctx.track(x), 1, "a convolution")
    if groups > 1 and groups == cin:
        if tin is None:
            return None
        out = np.repeat(tin, cout // cin)
        ctx.param_site(w, 0, out if out_ax == 0 else tin, "dw")
        _bias_site(ctx, b, out, "convolution")
        ctx.site("groups", tin, "groups", arg=groups_arg)
        if isinstance(std, wstd.Standardised):
            wstd.record(ctx, std, out, None)     # a depthwise filter is standardised over its kernel only
        return Track((1,), out)
    in_lab = None
    if tin is not None:
        in_lab = _grouped(ctx, tin, groups) if groups > 1 else tin
        ctx.param_site(w, in_ax, in_lab if in_ax == 1 else tin, "in")
    out = ctx.new(cout)
    out_lab = _grouped(ctx, out, groups) if groups > 1 else out
    ctx.param_site(w, out_ax, out if out_ax == 0 else out_lab, "out")
    _bias_site(ctx, b, out, "convolution")
    if isinstance(std, wstd.Standardised):
        wstd.record(ctx, std, out, in_lab)
    return Track((1,), out)


def _computed_weight(ctx: Ctx, call: Call, std: str | None) -> Track:
    """A weight computed at run time by anything but a per-channel chain (``fxadapt.ops.wstd``): the input
    and output channels keep their size; the output's form a frozen group whose reason names the op, so a
    model made of such layers is refused with it rather than with nothing to say."""
    reason = "convolution weight is computed at run time" + (f" ({std})" if std else "")
    ctx.freeze(ctx.track(call.arg(0, "input")), reason)
    out = ctx.new(ctx.out_shape()[1])
    ctx.freeze(out, reason)
    ctx.site("mix", out, "mix")
    return Track((1,), out)


@rule(*aten_ops("conv1d.default", "conv2d.default", "conv3d.default", "conv1d.padding", "conv2d.padding",
                "conv3d.padding"), kind="produces", cost=costs.conv_macs, zero="params", fold="absorbs",
      lift=Lift(lifts.build_conv, (0,), (1, 2)), edit=edits.set_count, latency_key=keys.conv_key)
def conv(call: Call, ctx: Ctx):
    return _conv(call, ctx, (0, 1), call.arg(6, "groups", 1))


@rule(*aten_ops("conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input"),
      kind="produces", cost=costs.conv_transpose_macs, zero="params", fold="absorbs", out_axis=1,
      lift=Lift(lifts.build_conv_transpose, (0,), (1, 2)), edit=edits.set_count,
      latency_key=keys.conv_transpose_key)
def conv_transpose(call: Call, ctx: Ctx):
    return _conv(call, ctx, (1, 0), call.arg(6, "groups", 1))


@rule(*aten_ops("convolution.default"), kind="produces", cost=costs.convolution_macs, zero="params",
      edit=edits.set_count, latency_key=keys.convolution_key)
def convolution(call: Call, ctx: Ctx):
    axes = (1, 0) if call.arg(6, "transposed", False) else (0, 1)
    return _conv(call, ctx, axes, call.arg(8, "groups", 1), groups_arg=8)


@rule(*aten_ops("linear.default"), kind="produces", cost=costs.linear_macs, zero="params", fold="absorbs",
      lift=Lift(lifts.build_linear, (0,), (1, 2)), latency_key=keys.linear_key)
def linear(call: Call, ctx: Ctx):
    """``y = x W^T + b`` over the last axis; other tracked axes of ``x`` pass through."""
    x, w, b = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    if not isinstance(w, ParamRef):
        return Blocked("linear weight is computed at run time")
    last = len(ctx.shape(x)) - 1
    t = ctx.track(x)
    new = ctx.new(ctx.shape(w)[0])
    ctx.param_site(w, 0, new, "out")
    _bias_site(ctx, b, new, "linear")
    if t is not None and last not in t.axes:
        ctx.freeze(new, "linear over an untracked axis while channels sit on another axis")
        return t
    if t is not None:
        ctx.param_site(w, 1, only_axis(ctx, t, last, "a linear layer"), "in")
    return Track((last,), new)


@rule(*aten_ops("embedding.default"), kind="produces", lift=Lift(lifts.build_embedding, (1,), (0,)))
def embedding(call: Call, ctx: Ctx):
    w = call.arg(0, "weight")
    if not isinstance(w, ParamRef):
        return Blocked("embedding table is computed at run time")
    new = ctx.new(ctx.shape(w)[1])
    ctx.param_site(w, 1, new, "out")
    return Track((len(ctx.out_shape()) - 1,), new)


def _norm_sites(ctx: Ctx, call: Call, lab, names: tuple[tuple[int, str], ...]):
    for idx, name in names:
        norm_param_site(ctx, call.arg(idx, name), 0, lab, f"norm {name}")


@rule(*aten_ops("batch_norm.default"), kind="passes", zero="params", fold="affine",
      lift=Lift(lifts.build_batch_norm, (0,), (1, 2, 3, 4)))
def batch_norm(call: Call, ctx: Ctx):
    """Per-channel affine + statistics over axis 1: every parameter/buffer is sliced with the channel."""
    lab = only_axis(ctx, ctx.track(call.arg(0, "input")), 1, "a batch norm")
    if lab is None:
        return None
    _norm_sites(ctx, call, lab, ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var")))
    return Track((1,), lab)


rule(*aten_ops("instance_norm.default"), kind="passes", name="batch_norm", zero="params")(batch_norm)


@rule(*aten_ops("group_norm.default"), kind="passes", zero="params",
      lift=Lift(lifts.build_group_norm, (0,), (2, 3)))
def group_norm(call: Call, ctx: Ctx):
    """Statistics over ``[groups, C/groups]`` blocks: intra-group positions are unioned across groups."""
    lab = only_axis(ctx, ctx.track(call.arg(0, "input")), 1, "a group norm")
    if lab is None:
        return None
    groups = call.arg(1, "num_groups")
    ctx.site("mix", lab, "mix")
    if groups > 1:
        _grouped(ctx, lab, groups)
    _norm_sites(ctx, call, lab, ((2, "weight"), (3, "bias")))
    return Track((1,), lab)


@rule(*aten_ops("layer_norm.default"), kind="passes", zero="params", edit=edits.set_shape_entry,
      lift=Lift(lifts.build_layer_norm, (0,), (2, 3)))
def layer_norm(call: Call, ctx: Ctx):
    """Normalises over the trailing ``len(normalized_shape)`` axes; a tracked one among them is sliced."""
    x = call.arg(0, "input")
    t = ctx.track(x)
    if t is None:
        return None
    nd, k = len(ctx.shape(x)), len(call.arg(1, "normalized_shape"))
    inside = [a for a in t.axes if a >= nd - k]
    if not inside:
        return t
    if len(t.axes) > 1:
        return Blocked("layer norm over a multi-axis channel layout")
    ax = inside[0]
    ctx.site("mix", t.labels, "mix")
    _axis_site = ax - (nd - k)
    for idx, name in ((2, "weight"), (3, "bias")):
        norm_param_site(ctx, call.arg(idx, name), _axis_site, t.labels, f"layer norm {name}")
    ctx.site("shape_arg", t.labels, "shape", arg=1, index=_axis_site)
    return t


@rule(*aten_ops("rms_norm.default"), kind="passes", edit=edits.set_shape_entry)
def rms_norm(call: Call, ctx: Ctx):
    x = call.arg(0, "input")
    t = ctx.track(x)
    nd = len(ctx.shape(x))
    if t is None or t.axes != (nd - 1,) or len(call.arg(1, "normalized_shape")) != 1:
        return t if t is None or nd - 1 not in t.axes else Blocked("rms norm over several axes")
    ctx.site("mix", t.labels, "mix")  # the mean of squares over channels: growth changes it
    norm_param_site(ctx, call.arg(2, "weight"), 0, t.labels, "rms norm weight")
    ctx.site("shape_arg", t.labels, "shape", arg=1, index=0)
    return t


__all__ = ["conv", "linear", "embedding", "batch_norm", "group_norm", "layer_norm", "norm_dim"]
