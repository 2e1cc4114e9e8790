"""MAC formulas of the registry entries (``OpSpec.cost``), as products of axis sizes.

A formula returns ``(coef, factors)``: ``MACs = coef * prod(f(n) for f in factors)`` where each factor is a
``LinearForm`` giving one tensor axis' size as a function of the kept units per group (``cx.form``). This
counts what ``torch.utils.flop_counter`` counts, divided by 2:

- convolution: every weight element is used once per output position:
  ``numel(out) / C_out * prod(weight axes)`` (transposed: ``numel(in) / C_in * prod(weight axes)``);
- linear ``y = x W^T``: ``prod(leading axes of out) * prod(weight axes)``;
- matmul family ``a[..., n, k] @ b[..., k, m]``: ``numel(out) * k``;
- scaled-dot-product attention: ``b*h*L*S*(E + Ev)`` (``q k^T`` and ``attn v``; ``h`` the query heads,
  a factor in ``heads`` mode);
- einsum: in ``fxadapt.ops.einsum`` beside its channel rule.

``cx`` (``fxadapt.analysis.cost_build.CostCtx``) gives shapes, tracks and the forms of axes and weights.

>>> from fxadapt.ops import OPS
>>> import torch
>>> OPS[torch.ops.aten.linear.default].cost.__name__
'linear_macs'
"""

from __future__ import annotations

import math
from typing import Any

from fxadapt.ir.channels import ParamRef, Track
from fxadapt.ops import operands
from fxadapt.ops.core import Call, param_behind_squeezes
from fxadapt.ops.forms import CostView
from fxadapt.ops.wstd import Standardised, standardised


def conv_macs(call: Call, cx: CostView):
    w, out = param_behind_squeezes(call.arg(1, "weight"), cx.shape), cx.out_shape
    std = standardised(w, cx.shape)
    w = std.param if isinstance(std, Standardised) else w
    if not isinstance(w, ParamRef):  # weight computed at run time (a slice): the rule froze it, fixed size
        return math.prod(out) / out[1], [cx.const(s) for s in cx.shape(w)]
    return math.prod(out) / out[1], cx.weight_factors(w)


def conv_transpose_macs(call: Call, cx: CostView):
    x, w = call.arg(0, "input"), call.arg(1, "weight")
    src = cx.shape(x)
    if not isinstance(w, ParamRef):
        return math.prod(src) / src[1], [cx.const(s) for s in cx.shape(w)]
    return math.prod(src) / src[1], cx.weight_factors(w)


def convolution_macs(call: Call, cx: CostView):
    return (conv_transpose_macs if call.arg(6, "transposed", False) else conv_macs)(call, cx)


def linear_macs(call: Call, cx: CostView):
    """Channels may sit on a leading axis of the output (a linear over the width of an NCHW tensor)."""
    w, out = call.arg(1, "weight"), cx.out_shape
    if not isinstance(w, ParamRef):
        return math.prod(out[:-1]), [cx.const(s) for s in cx.shape(w)]
    t, coef = cx.track(cx.node), 1.0
    rows: list = []
    for ax, size in enumerate(out[:-1]):
        form = cx.axis_form(t, ax, size)
        coef, rows = (coef * size, rows) if form is None else (coef, rows + [form])
    return coef, rows + cx.weight_factors(w)


def _matmul_term(cx: CostView, a: Any, b: Any):   # operands: nodes or parameters
    """``numel(out) * k``; ``k`` is tracked on ``a``'s last axis or, for ``W @ x``, on ``b``'s second-last."""
    k = cx.shape(a)[-1]
    out = cx.track(cx.node)
    coef, factors = cx.activation_factors(out, cx.out_shape)
    nd = len(cx.out_shape)
    for x, own in ((a, -2), (b, -1)):   # rows of a, columns of b: the output space not carried on
        sx = cx.shape(x) or ()          # (an outer product of two spaces keeps one; both sizes move)
        if len(sx) >= 2 and not (out is not None and nd + own in out.axes):
            t = cx.track(x)
            if t is None and cx.ctx is not None:   # a zero operand whose size follows channels
                zero = operands.zero_axis_labels(cx.ctx, x, len(sx) + own)
                t = Track((len(sx) + own,), zero) if zero is not None else None
            side = cx.axis_form(t, len(sx) + own, sx[own])
            if side is not None and side.coefs:
                coef, factors = coef / sx[own], factors + [side]
    form = cx.axis_form(cx.track(a), len(cx.shape(a)) - 1, k)
    if form is None and len(cx.shape(b) or ()) >= 2:
        form = cx.axis_form(cx.track(b), len(cx.shape(b)) - 2, k)
    return coef, factors + [form if form is not None else cx.const(k)]


def matmul_macs(call: Call, cx: CostView):
    return _matmul_term(cx, call.args[0], call.args[1])


def addmm_macs(call: Call, cx: CostView):
    return _matmul_term(cx, call.args[1], call.args[2])


def sdpa_macs(call: Call, cx: CostView):
    q, k, v = call.args[:3]
    qs, ks, vs = cx.shape(q), cx.shape(k), cx.shape(v)
    e = cx.axis_form(cx.track(q), len(qs) - 1, qs[-1], default=True)
    ev = cx.axis_form(cx.track(v), len(vs) - 1, vs[-1], default=True)
    coef, heads = cx.activation_factors(cx.track(q), qs[:-1])
    return coef * ks[-2], heads + [e + ev]


def recurrent_macs(gates: int):
    """LSTM (4 gates) / GRU (3): ``T*B*D*G*H*(I_0 + H + (L-1)*(D*H + H))`` (see ``fxadapt.ops.recurrent``)."""
    def macs(call: Call, cx: CostView):
        x, params = call.args[0], list(call.args[2])
        layers, dirs = call.args[4], 2 if call.args[7] else 1
        xs = cx.shape(x)
        steps = math.prod(xs[:-1])  # T * B
        h = cx.weight_factors(params[1])[1]
        i0 = cx.axis_form(cx.track(x), len(xs) - 1, xs[-1], default=True)
        k = 1 + (layers - 1) * (dirs + 1)
        rest = type(h)(h.const * k, tuple((g, c * k) for g, c in h.coefs))
        return float(steps * dirs * gates), [h, i0 + rest]

    macs.__name__ = f"recurrent_macs_{gates}"
    return macs
