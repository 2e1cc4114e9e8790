"""Rules for recurrent layers: ``aten.lstm.input`` (gates ``[i, f, g, o]``) and ``aten.gru.input`` (``[r, z,
n]``).

``params`` holds, per layer ``l`` and direction ``d``: ``W_ih[G*H, I_l]``, ``W_hh[G*H, H]`` (and, with biases,
``b_ih[G*H]``, ``b_hh[G*H]``); ``I_0`` is the input size, ``I_l = D*H`` after the first layer (the directions'
outputs concatenated). ``nn.LSTM``/``nn.GRU`` have one ``hidden_size``, so the hidden channels of every layer
and direction are one group of ``H`` units: unit ``h`` is row ``h`` of every gate block (rows ``k*H + h``),
column ``h`` of ``W_hh`` and of the next layer's ``W_ih`` (per direction block), and channel ``h`` (per
direction) of the output and the states. The input size comes from the producer (``W_ih`` of layer 0, axis 1).

Growth is function-preserving: a new unit's gate rows copy an old unit's, and every weight reading it
(``W_hh`` columns, the next layer's ``W_ih`` columns, the consumer of the output) is zero. The default zero
initial state (``aten.zeros([L*D, B, H])``) is a shape site.

MACs (what ``FlopCounterMode`` counts of the per-step matrix products, biases excluded):
``T * B * D * G * H * (I_0 + H + (L - 1) * (D*H + H))``.
"""

from __future__ import annotations

import numpy as np
from torch.fx import Node

from fxadapt.ir.channels import ParamRef, Site, Track
from fxadapt.ops import costs, edits
from fxadapt.ops.core import Blocked, Call, Ctx, aten_ops, only_axis, rule

_FACTORY = aten_ops("zeros.default")


def _recurrent(call: Call, ctx: Ctx, gates: int, states: int):
    x, hx, params = call.arg(0, "input"), call.arg(1, "hx"), list(call.arg(2, "params"))
    has_b, layers, bidir = call.arg(3, "has_biases"), call.arg(4, "num_layers"), call.arg(7, "bidirectional")
    dirs = 2 if bidir else 1
    per = 4 if has_b else 2
    if len(params) != layers * dirs * per or not all(isinstance(p, ParamRef) for p in params):
        return Blocked("recurrent weights are computed at run time or of an unexpected layout")
    hid = ctx.new(ctx.shape(params[1])[1])
    gate_rows = np.tile(hid, gates)
    t_in = only_axis(ctx, ctx.track(x), len(ctx.shape(x)) - 1, "a recurrent layer")
    for layer in range(layers):
        for d in range(dirs):
            w_ih, w_hh, *bias = params[(layer * dirs + d) * per:(layer * dirs + d + 1) * per]
            ctx.param_site(w_ih, 0, gate_rows, "out")
            ctx.site("gates", gate_rows, "gates")  # G blocks of all units: grows per block
            ctx.param_site(w_hh, 0, gate_rows, "out")
            ctx.param_site(w_hh, 1, hid, "in")
            for b in bias:
                ctx.param_site(b, 0, gate_rows, "bias")
            if layer:
                ctx.param_site(w_ih, 1, np.tile(hid, dirs), "in")
            elif t_in is not None:
                ctx.param_site(w_ih, 1, t_in, "in")
    h_axis = len(ctx.out_shape()[0]) - 1
    state = Track((2,), hid)
    for h in (hx if isinstance(hx, (list, tuple)) else [hx]):
        if not _zero_state_site(ctx, h, hid):
            ctx.freeze(hid, f"initial state {getattr(h, 'name', h)} has a fixed hidden size")
    return (Track((h_axis,), np.tile(hid, dirs)),) + (state,) * (states - 1)


def _zero_state_site(ctx: Ctx, h, hid) -> bool:
    """The default initial state ``zeros([L*D, B, H])``: its size entry 2 follows the hidden width."""
    t = ctx.track(h)
    if t is not None:
        ctx.couple(only_axis(ctx, t, 2, "a recurrent state"), hid)
        return True
    if not isinstance(h, Node) or h.target not in _FACTORY:
        return False
    args = [a for a in h.args] + [h.kwargs.get(k) for k in ("dtype", "layout", "device", "pin_memory")]
    if not edits.droppable(h.target, args):
        return False
    ctx.ledger.sites.append(Site("shape_arg", np.asarray(hid), "shape", h.name, arg=0, index=2))
    return True


@rule(*aten_ops("lstm.input"), kind="produces", cost=costs.recurrent_macs(4), zero=None)
def lstm(call: Call, ctx: Ctx):
    return _recurrent(call, ctx, gates=4, states=3)


@rule(*aten_ops("gru.input"), kind="produces", cost=costs.recurrent_macs(3), zero=None)
def gru(call: Call, ctx: Ctx):
    return _recurrent(call, ctx, gates=3, states=2)
