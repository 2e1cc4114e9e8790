"""Widths a model's config can state: under ``layers="uniform"`` the hidden size and the head count move
together the way the model's family derives them.

A config states one hidden size ``h`` and one head count; families derive the rest from them (GPT-2 and
BERT: ``head_dim = h / heads``, so whole heads move with the hidden size; Llama: ``h % heads == 0`` is
validated). The pipeline knows the family (``fxadapt.pipeline.stated``) and hands this module a
``Statable``: the hidden group, the whole-head groups and ``ok(h, j)``: whether the config can state the
hidden width ``h`` with ``j`` head units (kv groups) in every layer. Given uniform widths ``n``:

    if ok(n_hidden, n_heads): n stays
    else: candidates (h, j) with ok(h, j), h on the hidden group's ladder (its own width when it cannot
          move), j on the heads' ladder, nearest (in log-width) to (n_hidden, n_heads) first, at most
          ``MAX_CANDIDATES``; for each, hidden and heads are fixed there (one-rung bounds) and the other
          classes re-solved (``shared_widths``; their alignment halved down to 1 while the window is out
          of reach, as ``halving`` does for the plain solve); the first in the budget's window wins.

No candidate in the window: ``n`` stays (the write-back then marks the config, ``fxadapt.writeback.stock``,
and the recipe carries the widths).

Example (a predicate that wants the hidden size to be 16 per head unit):
    >>> import torch, fxadapt
    >>> from fxadapt.planning.solver import SolveConfig
    >>> st = Statable(hidden=0, heads=(1,), ok=lambda h, j: h == 16 * j)
    >>> st.holds({0: 48, 1: 3}), st.holds({0: 40, 1: 3})
    (True, False)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fxadapt.planning.solver import SolveConfig, checked_bounds, group_ladder, in_window
from fxadapt.planning.uniform import Tying, shared_widths

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis

MAX_CANDIDATES = 24


@dataclass(frozen=True)
class Statable:
    """The hidden group (``None``: no hidden group), the whole-head groups, and ``ok(h, j)``."""

    hidden: int | None
    heads: tuple[int, ...]
    ok: Callable[[int, int], bool]

    def holds(self, units: dict[int, int]) -> bool:
        j = {units[g] for g in self.heads if g in units}
        h = units.get(self.hidden) if self.hidden is not None else None
        return len(j) <= 1 and (not j or h is None or self.ok(h, j.pop()))


def stated_widths(a: Analysis, units: dict[int, int], target: float, cfg: SolveConfig, st: Statable,
                  tying: Tying = Tying()) -> dict[int, int]:
    """``units`` (uniform widths) moved to the nearest widths ``st.ok`` accepts that stay in the budget's
    window (module docstring)."""
    full = {g.id: units.get(g.id, g.units) for g in a.groups}
    if not st.heads or st.holds(full):
        return units
    bounds = checked_bounds(a, target, cfg)
    if any(g not in bounds for g in st.heads):   # a head group the solver does not move: no candidates
        return units
    align = cfg.alignment()
    hid = st.hidden
    hs = [full[hid]] if hid is None or hid not in bounds \
            else list(group_ladder(a.groups[hid], bounds[hid], align))
    head = st.heads[0]
    js = list(group_ladder(a.groups[head], bounds[head], align))
    h0, j0 = (full[hid] if hid is not None else 1), full[head]
    cands = sorted(((int(h), int(j)) for h in hs for j in js if st.ok(int(h), int(j))),
                   key=lambda c: abs(np.log(c[0] / h0)) + abs(np.log(c[1] / j0)))
    grow = target > a.cost.macs()
    finer = [dataclasses.replace(cfg, align=k) for k in _halvings(align)]
    for h, j in cands[:MAX_CANDIDATES]:
        fixed = {g: j for g in st.heads} | ({hid: h} if hid is not None else {})
        b = {g: ((w, w) if g in fixed else lim) for g, lim in bounds.items() for w in [fixed.get(g, 0)]}
        for c in finer:   # the other classes at the alignment, halved while the window is out of reach
            try:
                out, m, _ = shared_widths(a, {**units, **fixed}, target, c, b, tying)
            except Exception:  # noqa: BLE001 - a candidate the solver cannot set up is no candidate
                break
            if in_window(m, target, grow, cfg.tol):
                return out
    return units


def _halvings(align: int) -> list[int]:
    """The alignment and its halvings down to 1.

    >>> _halvings(8)
    [8, 4, 2, 1]
    """
    out = [max(int(align), 1)]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out
