"""Grouped heads: ``repeat_interleave(x, r, dim)`` with an integer repeat count.

Grouped SSM heads (Mamba-2's ``B.repeat_interleave(H // G, dim=2)``), grouped-query key/value heads written
with ``repeat_interleave`` and gated delta-nets' ``query.repeat_interleave(Hv // Hk, dim=2)`` repeat every
position of one axis ``r`` times in place: position ``i`` becomes positions ``i*r .. i*r + r - 1``.

- repeated axis untracked (the group axis of ``B`` while its ``d_state`` axis carries channels): the
  channels pass through unchanged;
- repeated axis tracked: the output carries every label ``r`` times in a row (``np.repeat``), so a kept
  channel keeps all its copies and ``r`` stays valid; the ``output_size`` hint is dropped on rewrite (a
  ``shape_arg`` site whose edit removes it), since it counts the copies;
- no ``dim`` (the flattened input is repeated): channels cannot follow (``Blocked``); a tensor of repeat
  counts (``repeat_interleave.Tensor``, data-dependent) has no entry and freezes with that reason.

>>> import torch
>>> from fxadapt.ops import OPS
>>> OPS[torch.ops.aten.repeat_interleave.self_int].name
'repeat_interleave'
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch._ops import OpOverload

from fxadapt.ir.channels import Site, Track
from fxadapt.ops.core import Blocked, Call, Ctx, aten_ops, norm_dim, rule


def drop_output_size(op: OpOverload, args: list, site: Site, index: np.ndarray,
                     val: Any) -> tuple[OpOverload, list]:
    """The rewritten call without its ``output_size`` hint (keyword-only; it counted the old copies)."""
    return op, list(args[:3])


@rule(*aten_ops("repeat_interleave.self_int"), kind="reindexes", zero="preserves", edit=drop_output_size)
def repeat_interleave(call: Call, ctx: Ctx):
    x, reps, dim = call.arg(0, "self"), call.arg(1, "repeats"), call.arg(2, "dim")
    t = ctx.track(x)
    if t is None:
        return None
    if dim is None:
        return Blocked("repeat_interleave without dim repeats the flattened input")
    if not isinstance(reps, int):
        return Blocked(f"repeat_interleave with a symbolic repeat count {reps}")
    d = norm_dim(dim, len(ctx.shape(x)))
    if d not in t.axes:
        return t
    if len(t.axes) > 1:
        return Blocked(f"repeat_interleave along axis {d} of a tensor with channels on axes {t.axes}")
    out = np.repeat(t.labels, reps)
    if call.kwargs.get("output_size") is not None or len(call.args) > 3:
        ctx.site("shape_arg", out, "shape", arg=3)
    return Track(t.axes, out)
