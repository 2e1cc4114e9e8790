"""Uniform layers (``TransformConfig(layers="uniform")``): groups that repeat across layers take one width,
so a stock config (``intermediate_size``, ``num_attention_heads``...) can state the result.

Classes: prunable groups whose parameter sites name the same tensors up to container indices
(``model.layers.3.mlp.up_proj.weight`` ~ ``model.layers.*.mlp.up_proj.weight``) and that have the same unit
count, granularity and ladder are one class ``C``; every other group is a class of its own.

Widths: class ``C`` takes one rung ``r_C`` of its (shared) ladder, so ``n_g = r_C`` for ``g in C``. Start at
the rung nearest the mean of the members' solved widths; then, while ``M(n)`` is outside the window, take
the class move (one rung up or down, or a swap: one class up and another down) that lands closest to
``T`` on the right side of it, all candidates of a round evaluated at once by the cost polynomial. When no
move reaches the window, ``strict`` raises ``BudgetError`` and otherwise the closest uniform widths come
back with a ``BudgetWarning`` that says per-layer widths reach it (``layers="any"``).

Example:
    >>> import torch, fxadapt
    >>> blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
    ...                              torch.nn.Linear(32, 8)) for _ in range(3))
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.blocks = blocks
    ...     def forward(self, x):
    ...         for b in self.blocks:
    ...             x = x + b(x)
    ...         return x
    >>> a = fxadapt.analyze(Net(), (torch.randn(2, 8),))
    >>> n = uniform_widths(a, {0: 10, 1: 14, 2: 12}, 0.4 * a.macs(), SolveConfig(align=1))
    >>> len({n[g.id] for g in a.prunable if g.units == 32})
    1
"""

from __future__ import annotations

import re

import numpy as np

from fxadapt.errors import BudgetError, warn
from fxadapt.planning.solver import SolveConfig, _checked_bounds, _problem, in_window

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def classes(a, gids: list[int]) -> list[list[int]]:
    """Groups of ``gids`` that repeat across layers, as lists of group ids (singletons included)."""
    out: dict[tuple, list[int]] = {}
    for g in gids:
        group = a.groups[g]
        names = sorted({_INDEX.sub("*", m.site.ref.target) for m in group.members
                        if m.site.kind == "param" and m.site.ref is not None})
        key = (tuple(names), group.units, group.granularity) if names else ("group", g)
        out.setdefault(key, []).append(g)
    return list(out.values())


def uniform_widths(a, units: dict[int, int], target: float, cfg: SolveConfig) -> dict[int, int]:
    """``units`` (a solver's widths) with every class of repeated groups at one width (module docstring)."""
    bounds = _checked_bounds(a, target, cfg)
    grow = target > a.cost.macs()
    p = _problem(a, target, bounds, {g: a.groups[g].units for g in bounds}, cfg)
    pos = {g: k for k, g in enumerate(p.lad.gids)}
    cls = [c for c in classes(a, p.lad.gids) if len({p.lad.size[pos[g]] for g in c}) == 1] or []
    members = [np.array([pos[g] for g in c]) for c in cls]
    rungs = [p.lad.rungs[m[0]] for m in members]
    idx = np.array([int(np.argmin(np.abs(r - np.mean([units.get(p.lad.gids[k], r[-1]) for k in m]))))
                    for r, m in zip(rungs, members)])
    idx = _repair(p, members, rungs, idx, grow, cfg.tol)
    out = dict(units)
    for r, m, i in zip(rungs, members, idx):
        out.update({p.lad.gids[k]: int(r[i]) for k in m})
    _verdict(p, _x(p, members, rungs, idx), target, grow, cfg)
    return out


def _x(p, members, rungs, idx) -> np.ndarray:
    x = p.poly.base.copy()
    for r, m, i in zip(rungs, members, idx):
        x[p.cols[m]] = r[i]
    return x


def _repair(p, members, rungs, idx, grow: bool, tol: float) -> np.ndarray:
    """Class moves toward the window (see module docstring)."""
    idx = idx.copy()
    for _ in range(10_000):
        m = p.poly(_x(p, members, rungs, idx)[None])[0]
        if in_window(m, p.target, grow, tol):
            return idx
        cands = _moves(idx, [len(r) for r in rungs])
        if not cands:
            return idx
        X = np.stack([_x(p, members, rungs, c) for c in cands])
        ms = p.poly(X)
        side = ms >= p.target if grow else ms <= p.target
        here = m >= p.target if grow else m <= p.target
        better = side & (np.abs(ms - p.target) < abs(m - p.target)) if here else side
        if better.any():
            idx = cands[int(np.argmin(np.where(better, np.abs(ms - p.target), np.inf)))]
        elif not here and ((ms > m) if grow else (ms < m)).any():   # still on the wrong side: toward T
            idx = cands[int(np.argmax(ms) if grow else np.argmin(ms))]
        else:
            return idx
    return idx


def _moves(idx: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Every one-rung move of one class, and every swap (one class up, another down)."""
    out = []
    for k in range(len(idx)):
        for d in (-1, 1):
            if 0 <= idx[k] + d < sizes[k]:
                c = idx.copy()
                c[k] += d
                out.append(c)
    if len(idx) <= 64:
        for i in range(len(idx)):
            for j in range(len(idx)):
                if i != j and idx[i] + 1 < sizes[i] and idx[j] >= 1:
                    c = idx.copy()
                    c[i] += 1
                    c[j] -= 1
                    out.append(c)
    return out


def _verdict(p, x, target: float, grow: bool, cfg: SolveConfig) -> None:
    from fxadapt.planning.budget import BudgetWarning

    m = p.poly(x[None])[0]
    if in_window(m, target, grow, cfg.tol):
        return
    if (m < target) if grow else (m > target * (1 + 1e-9)):
        raise BudgetError(f"layers='uniform': no widths shared by every layer reach the target {target:,.0f} MACs "
                          f"(closest {m:,.0f}, {m / target:.3f}x); use layers='any' for per-layer widths")
    msg = (f"layers='uniform': the closest widths shared by every layer give {m:,.0f} MACs "
           f"({m / target:.3f}x the target {target:,.0f}), outside the {cfg.tol:.0%} window; per-layer widths "
           f"(layers='any') reach it")
    if cfg.strict:
        raise BudgetError(msg)
    warn(msg, BudgetWarning)
