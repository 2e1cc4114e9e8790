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

Ties (``Tying.ties``): sets of groups that must share one width for another reason (a model's code reads a
size at run time that the graph holds as a constant, ``fxadapt.pipeline.replan``) are merged into the
classes the same way (union of overlapping sets); ``Tying(repeated=False)`` ties those alone and leaves
every other group a class of its own. A class whose members' ladders differ stays one class per group,
except where the members count different units (granularities ``k_g``: a hidden size of channels tied to
an attention's whole heads): one width in channels then, ``n_g k_g = c`` for every member, over the channel
widths ``c`` every member's ladder holds (none: one class per group). A tie with a group the solver does
not move pins its tied groups of the same original channel width (``pinned_by_ties``).

Apart (``Apart``, in ``Tying.ties``): two groups whose channel widths differed and must stay different (a
model's code compares the two sizes and skips a projection when they are equal:
``if hidden_size != hidden_size_output``): a start that makes them equal moves to the nearest allowed
widths, and no move lands on equal ones. ``Ties`` holds several ties found at once (the same rule in every
module of one class, ``fxadapt.pipeline.replan``): each part is a tie of its own.
``bounds`` (default: the solver's, after the reachable-range check) caps the rungs, e.g. at a MAC solution
that a params solve must not exceed (``fxadapt.pipeline.params``).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fxadapt.errors import BudgetError, BudgetWarning, warn
from fxadapt.planning.solver import SolveConfig, checked_bounds, counted, in_window, ladder_problem

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


@dataclass(frozen=True)
class Tying:
    """Which groups share a width: ``repeated`` (groups repeated across layers, ``classes``) and ``ties``
    (sets of group ids, e.g. from a failed write-back)."""

    repeated: bool = True
    ties: tuple[frozenset[int], ...] = ()

    def what(self) -> str:
        return "layers='uniform'" if self.repeated else "tied widths"

    def joined(self) -> list[frozenset[int]]:
        """The ties that share a width (every tie but the ``Apart`` pairs; a ``Ties``' parts)."""
        out: list[frozenset[int]] = []
        for t in self.ties:
            if isinstance(t, Ties):
                out.extend(t.parts)
            elif not isinstance(t, Apart):
                out.append(t)
        return out

    def apart(self) -> list[frozenset[int]]:
        return [t for t in self.ties if isinstance(t, Apart)]


class Apart(frozenset):
    """Two group ids whose channel widths must differ (module docstring); a ``frozenset`` so it rides in
    ``Tying.ties`` and the pipeline's ties like a tie."""


class Ties(frozenset):
    """Several ties found at once (one rule in every module of a class): each part shares one width, the
    parts need not. The union of the parts as a ``frozenset``, so it rides in ``Tying.ties`` like a tie.

    >>> t = Ties([{0, 1}, {2, 3}])
    >>> sorted(t), tied_classes(None, [0, 1, 2, 3, 4], Tying(False, (t,)))
    ([0, 1, 2, 3], [[0, 1], [2, 3], [4]])
    """

    parts: tuple[frozenset[int], ...]

    def __new__(cls, parts):
        parts = tuple(frozenset(p) for p in parts)
        self = super().__new__(cls, frozenset().union(*parts))
        self.parts = parts
        return self

    def __reduce__(self):
        return (Ties, (self.parts,))


def classes(a: Analysis, gids: list[int]) -> list[list[int]]:
    """Groups of ``gids`` that repeat across layers, as lists of group ids (singletons included)."""
    out: dict[tuple, list[int]] = {}
    for g in gids:
        group = a.groups[g]
        names = sorted({_INDEX.sub("*", m.site.ref.target) for m in group.members
                        if m.site.kind == "param" and m.site.ref is not None})
        key = (tuple(names), group.units, group.granularity) if names else ("group", g)
        out.setdefault(key, []).append(g)
    return list(out.values())


def tied_classes(a: Analysis, gids: list[int], tying: Tying = Tying()) -> list[list[int]]:
    """``classes`` (or singletons, ``repeated=False``) merged along ``tying.ties`` (ids outside ``gids``
    are ignored), in the order of ``gids``.

    >>> tied_classes(None, [0, 1, 2, 3], Tying(False, (frozenset({0, 2}), frozenset({2, 3}))))
    [[0, 2, 3], [1]]
    """
    parent = {g: g for g in gids}

    def find(g):
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    base = classes(a, gids) if tying.repeated else [[g] for g in gids]
    for c in [*base, *([g for g in t if g in parent] for t in tying.joined())]:
        for g in c[1:]:
            parent[find(g)] = find(c[0])
    out: dict[int, list[int]] = {}
    for g in gids:
        out.setdefault(find(g), []).append(g)
    return list(out.values())


def uniform_widths(a: Analysis, units: dict[int, int], target: float, cfg: SolveConfig,
                   bounds: dict | None = None, tying: Tying = Tying()) -> dict[int, int]:
    """``units`` (a solver's widths) with every class of tied groups at one width (module docstring)."""
    out, m, grow = shared_widths(a, units, target, cfg, bounds, tying)
    _verdict(m, target, grow, cfg, tying, counted(a))
    return out


def shared_widths(a: Analysis, units: dict[int, int], target: float, cfg: SolveConfig,
                  bounds: dict | None = None, tying: Tying = Tying()) -> tuple[dict[int, int], float, bool]:
    """``uniform_widths`` without the verdict: the widths, their total and whether the target grows."""
    bounds = checked_bounds(a, target, cfg) if bounds is None else bounds
    pinned = pinned_by_ties(a, bounds, tying)
    bounds = {g: b for g, b in bounds.items() if g not in pinned}
    units = {**units, **pinned}
    grow = target > a.cost.macs()
    p = ladder_problem(a, target, bounds, {g: a.groups[g].units for g in bounds}, cfg)
    pos = {g: k for k, g in enumerate(p.lad.gids)}
    members, rungs = [], []
    for c in tied_classes(a, p.lad.gids, tying):
        for part, r in _class_rungs(a, p, pos, c):
            members.append(np.array([pos[g] for g in part]))
            rungs.append(r)
    grans = [np.array([a.groups[p.lad.gids[k]].granularity for k in m]) for m in members]
    idx = np.array([int(np.argmin(np.abs(r[:, 0] * k[0] - np.mean(
        [units.get(p.lad.gids[j], r[-1, i]) * k[i] for i, j in enumerate(m)]))))
        for r, m, k in zip(rungs, members, grans)])
    ok = _apart_check(a, p, members, rungs, {**units, **pinned}, tying.apart())
    idx = _repair(p, members, rungs, idx, grow, cfg.tol, ok)
    out = dict(units)
    for r, m, i in zip(rungs, members, idx):
        out.update({p.lad.gids[k]: int(r[i, j]) for j, k in enumerate(m)})
    return out, float(p.poly(_x(p, members, rungs, idx)[None])[0]), grow


def _class_rungs(a: Analysis, p, pos: dict, c: list[int]) -> list[tuple[list[int], np.ndarray]]:
    """A class as ``(members, rungs)`` with ``rungs[i, j]`` the units of member ``j`` at rung ``i``: one
    ladder shared, or for members of different granularities the channel widths every ladder holds (module
    docstring); else one class per group."""
    lads = [p.lad.rungs[pos[g]] for g in c]
    one = lambda: [([g], r[:, None]) for g, r in zip(c, lads)]  # noqa: E731
    if len(c) == 1 or all(np.array_equal(lads[0], r) for r in lads):
        return [(c, np.repeat(lads[0][:, None], len(c), 1))]
    ks = [a.groups[g].granularity for g in c]
    if len(set(ks)) == 1:
        return one()
    common = lads[0] * ks[0]
    for r, k in zip(lads[1:], ks[1:]):
        common = np.intersect1d(common, r * k)
    if not common.size:
        return one()
    return [(c, np.stack([common // k for k in ks], 1).astype(np.int64))]


def _apart_check(a: Analysis, p, members, rungs, fixed: dict, pairs: list):
    """``ok(idx)``: every ``Apart`` pair at different channel widths (a group outside the problem at its
    width in ``fixed``, else its original)."""
    where = {int(k): (c, j) for c, m in enumerate(members) for j, k in enumerate(m)}
    pos = {g: k for k, g in enumerate(p.lad.gids)}

    def chans(g: int, idx) -> int:
        k = a.groups[g].granularity
        if g in pos:
            c, j = where[pos[g]]
            return int(rungs[c][idx[c], j]) * k
        return fixed.get(g, a.groups[g].units) * k

    pairs = [tuple(t) for t in pairs if len(t) == 2]
    return lambda idx: all(chans(x, idx) != chans(y, idx) for x, y in pairs)


def pinned_by_ties(a: Analysis, bounds: dict, tying: Tying) -> dict[int, int]:
    """Movable groups tied (``tying.ties``) to a group the solver does not move (outside ``bounds``: frozen,
    or unable to grow under a norm) of the same original channel width: each stays at that width, so the tie
    holds instead of being dropped (RWKV's state: the attention tied to a hidden size that cannot grow).

    >>> class G:
    ...     def __init__(self, units, granularity=1): self.units, self.granularity = units, granularity
    >>> class A: groups = [G(8), G(8), G(8), G(32), G(2, 16)]
    >>> pinned_by_ties(A(), {1: (1, 16), 2: (1, 16), 4: (1, 8)}, Tying(False, (frozenset({0, 1}),
    ...                                                                        frozenset({3, 4}))))
    {1: 8, 4: 2}
    """
    out: dict[int, int] = {}
    chans = lambda g: a.groups[g].units * a.groups[g].granularity  # noqa: E731
    for tie in tying.joined():
        fixed = {chans(g) for g in tie if g not in bounds}
        if len(fixed) != 1:
            continue
        width = fixed.pop()
        out.update({g: width // a.groups[g].granularity for g in tie if g in bounds and chans(g) == width})
    return out


def _x(p, members, rungs, idx) -> np.ndarray:
    x = p.poly.base.copy()
    for r, m, i in zip(rungs, members, idx):
        x[p.cols[m]] = r[i]
    return x


def _repair(p, members, rungs, idx, grow: bool, tol: float, ok=lambda idx: True) -> np.ndarray:
    """Class moves toward the window (see module docstring); only to widths ``ok`` allows (``Apart``), and
    from a start it does not allow to the allowed move nearest the target (on its right side first)."""
    idx = idx.copy()
    for _ in range(10_000):
        m = p.poly(_x(p, members, rungs, idx)[None])[0]
        allowed = ok(idx)
        if allowed and in_window(m, p.target, grow, tol):
            return idx
        cands = [c for c in _moves(idx, [len(r) for r in rungs]) if ok(c)]
        if not cands:
            return idx
        X = np.stack([_x(p, members, rungs, c) for c in cands])
        ms = p.poly(X)
        side = ms >= p.target if grow else ms <= p.target
        if not allowed:
            dist = np.abs(ms - p.target)
            idx = cands[int(np.argmin(dist + np.where(side, 0.0, dist.max() + 1)))]
            continue
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


def _verdict(m: float, target: float, grow: bool, cfg: SolveConfig, tying: Tying, what: str) -> None:
    if in_window(m, target, grow, cfg.tol):
        return
    how, who = tying.what(), "every layer" if tying.repeated else "the tied groups"
    other = "per-layer widths (layers='any')" if tying.repeated else "untied widths"
    if (m < target) if grow else (m > target * (1 + 1e-9)):
        raise BudgetError(f"{how}: no widths shared by {who} reach the target {target:,.0f} {what} "
                          f"(closest {m:,.0f}, {m / target:.3f}x)"
                          + ("; use layers='any' for per-layer widths" if tying.repeated else ""))
    msg = (f"{how}: the closest widths shared by {who} give {m:,.0f} {what} "
           f"({m / target:.3f}x the target {target:,.0f}), outside the {cfg.tol:.0%} window; {other} reach "
           "it")
    if cfg.strict:
        raise BudgetError(msg)
    warn(msg, BudgetWarning)
