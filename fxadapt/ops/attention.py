"""Rules for attention: ``scaled_dot_product_attention`` over ``[.., H, L, E]``.

Channels on the last axis (``head_dim`` mode, ``fxadapt.ops.heads``): q and k are contracted (coupled, a
``mix`` site) and the output carries v's channels. Channels on the head axis (``heads`` mode): the heads of
q, k and v are coupled, with grouped-query attention every kv head with its ``H_q / H_kv`` query heads, and
the output carries q's heads; an additive mask with one slice per head follows them or freezes them.
"""

from __future__ import annotations

import numpy as np

from fxadapt.ops import costs
from fxadapt.ops.core import Call, Ctx, aten_ops, rule


@rule(*aten_ops("scaled_dot_product_attention.default"), kind="couples", cost=costs.sdpa_macs)
def sdpa(call: Call, ctx: Ctx):
    """softmax(q k^T) v over ``[.., H, L, E]``. Channels on the last axis (``head_dim`` mode): q/k coupled
    (a contraction: ``mix``), the output carries v's. Channels on the head axis (``heads`` mode): the heads of
    q, k and v are coupled (with grouped-query attention, kv head ``j`` with query heads
    ``j*r .. j*r + r - 1``, ``r = H_q / H_kv``) and the output carries q's heads."""
    q, k, v = call.arg(0, "query"), call.arg(1, "key"), call.arg(2, "value")
    nd = len(ctx.out_shape() or ())
    tq, tk, tv = ctx.track(q), ctx.track(k), ctx.track(v)
    if any(t is not None and nd - 3 in t.axes for t in (tq, tk, tv)):
        out = _sdpa_heads(ctx, (tq, tk, tv), nd - 3)
        return _head_mask(ctx, call.arg(3, "attn_mask"), out, nd)

    if tq is not None and tk is not None and tq.axes == tk.axes:
        ctx.couple(tq.labels, tk.labels)
        ctx.site("mix", tq.labels, "mix")
    elif tq is not None or tk is not None:
        ctx.freeze(tq, "query/key channels on different axes")
        ctx.freeze(tk, "query/key channels on different axes")
    if tq is not None and any(a < nd - 1 for a in tq.axes) and tv is not None and tv.axes != tq.axes:
        ctx.freeze(tv, "value heads not aligned with query heads")
        return None
    return tv


def _sdpa_heads(ctx: Ctx, tracks, axis: int):
    if any(t is None or t.axes != (axis,) for t in tracks):
        for t in tracks:
            ctx.freeze(t, "attention heads tracked on some of query/key/value only")
        return None
    tq, tk, tv = tracks
    for t in (tk, tv):
        if not couple_heads(ctx, tq.labels, t.labels):
            ctx.freeze(tq, f"{len(tq.labels)} query heads do not group over {len(t.labels)} key/value heads")
            ctx.freeze(t, "key/value heads do not divide the query heads")
            return None
    return tq


def _head_mask(ctx: Ctx, mask, out, nd: int):
    """An additive mask / bias with one slice per head (Swin's relative position bias) must follow the heads:
    a tracked one is coupled, a fixed-size one freezes them."""
    shape = ctx.shape(mask) if mask is not None else None
    if out is None or not shape or len(shape) < 3 or shape[len(shape) - 3] == 1:
        return out
    tm = ctx.track(mask)
    tm = tm.moved({a: a + nd - len(shape) for a in tm.axes}) if tm is not None else None
    if tm is not None and tm.axes == out.axes and tm.labels.shape == out.labels.shape:
        ctx.couple(out.labels, tm.labels)
        return out
    ctx.freeze(out, f"attention mask/bias {getattr(mask, 'name', mask)} has a fixed number of heads")
    return None


def couple_heads(ctx: Ctx, q: np.ndarray, kv: np.ndarray) -> bool:
    """Union query heads with their key/value head (grouped-query attention when there are fewer kv heads)."""
    if len(q) % len(kv):
        return False
    ctx.couple(q.reshape(len(kv), -1), kv[:, None])
    return True
