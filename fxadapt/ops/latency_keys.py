"""Latency lookup-table keys of the registry entries (``OpSpec.latency_key``).

A key function has the signature of a cost formula, ``(call, cx) -> tuple``; the tuple is a *template*:
entries that depend on the adapted widths are ``LinearForm``s in the kept units per group (``cx.form``, as
in ``fxadapt.ops.costs``), every other entry is a plain value. ``resolve(template, n)`` evaluates the forms
at the kept units ``n`` and gives the concrete key, which holds what a layer's run time depends on (HALP's
table: batch, input/output channels, feature-map size, kernel, stride, groups; plus padding, dilation,
bias and dtype):

- convolution: ``("conv", batch, C_in, C_out, groups, in_spatial, kernel, stride, padding, dilation,
  transposed, output_padding, bias, dtype)``; a depthwise conv's ``groups`` is ``C_in``'s form;
- linear: ``("linear", rows, in_features, out_features, bias, dtype)`` with ``rows`` the product of the
  leading axes (a form when channels sit on one of them).

>>> from fxadapt.ops.forms import LinearForm
>>> resolve(("conv", 1, LinearForm(0.0, ((3, 2.0),)), 8), {3: 4})
('conv', 1, 8, 8)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fxadapt.ops.forms import CostView, LinearForm

if TYPE_CHECKING:
    from fxadapt.ops.core import Call


def _tuple(v, nd: int) -> tuple:
    if isinstance(v, str):
        return (v,)
    v = tuple(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))
    return v * nd if len(v) == 1 else v


def _dtype(cx: CostView, x) -> str:
    meta = getattr(x, "meta", {}) or {}
    val = meta.get("val")
    return str(getattr(val, "dtype", "torch.float32")).removeprefix("torch.")


def _conv_key(call: Call, cx: CostView, transposed: bool, pos: dict):
    x, w, b = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    xs, ws, out = cx.shape(x), cx.shape(w), cx.out_shape
    if xs is None or ws is None or out is None:
        return None
    nd = len(ws) - 2
    groups = int(call.arg(pos["groups"], "groups", 1))
    cin = cx.axis_form(cx.track(x), 1, xs[1], default=True)
    cout = cx.axis_form(cx.track(cx.node), 1, out[1], default=True)
    g = cin if groups > 1 and groups == xs[1] else groups
    stride = _tuple(call.arg(3, "stride", 1), nd)
    padding = _tuple(call.arg(4, "padding", 0), nd)
    dilation = _tuple(call.arg(pos["dilation"], "dilation", 1), nd)
    opad = _tuple(call.arg(pos["output_padding"], "output_padding", 0), nd) if transposed else (0,) * nd
    return ("conv", int(xs[0]), cin, cout, g, tuple(int(s) for s in xs[2:]), tuple(int(k) for k in ws[2:]),
            stride, padding, dilation, transposed, opad, b is not None, _dtype(cx, x))


def conv_key(call: Call, cx: CostView):
    """``conv{1,2,3}d`` (``.default`` and ``.padding``)."""
    return _conv_key(call, cx, False, {"dilation": 5, "groups": 6, "output_padding": None})


def conv_transpose_key(call: Call, cx: CostView):
    """``conv_transpose{1,2,3}d.input``: ``(input, weight, bias, stride, padding, output_padding, groups,
    dilation)``."""
    return _conv_key(call, cx, True, {"dilation": 7, "groups": 6, "output_padding": 5})


def convolution_key(call: Call, cx: CostView):
    """``convolution.default``: ``(input, weight, bias, stride, padding, dilation, transposed,
    output_padding, groups)``."""
    tr = bool(call.arg(6, "transposed", False))
    return _conv_key(call, cx, tr, {"dilation": 5, "groups": 8, "output_padding": 7})


def linear_key(call: Call, cx: CostView):
    x, w, b = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    xs, ws, out = cx.shape(x), cx.shape(w), cx.out_shape
    if xs is None or ws is None or out is None:
        return None
    t, rows, const = cx.track(cx.node), [], 1
    for ax, size in enumerate(out[:-1]):
        form = cx.axis_form(t, ax, size)
        if form is None:
            const *= int(size)
        else:
            rows.append(form)
    fin = cx.axis_form(cx.track(x), len(xs) - 1, xs[-1], default=True)
    fout = cx.axis_form(t, len(out) - 1, out[-1], default=True)
    return ("linear", (const, *rows), fin, fout, b is not None, _dtype(cx, x))


def _value(v, n: dict):
    if isinstance(v, LinearForm):
        return int(round(v.value(n)))
    if isinstance(v, tuple):
        return tuple(_value(i, n) for i in v)
    return v


def resolve(template: tuple, n: dict) -> tuple:
    """The concrete key of ``template`` at kept units ``n`` (every group of the forms must be in ``n``);
    a linear layer's ``rows`` collapse to one product."""
    key = _value(template, n)
    if key and key[0] == "linear" and isinstance(key[1], tuple):
        key = (key[0], math.prod(key[1])) + key[2:]
    return key
