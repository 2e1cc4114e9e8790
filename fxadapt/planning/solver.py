"""The data-free width solver: one global scale, then rung moves into the budget window.

Notation: group ``g`` has ``N_g`` units and bounds ``[lo_g, hi_g]`` (shrinking: ``lo_g = max(1, ceil(
min_ratio N_g))``, ``hi_g = N_g``; growing: ``lo_g = N_g``, ``hi_g = max_expand N_g``, only for groups that
can grow). Its *ladder* ``R_g`` is the sorted set of unit counts in the bounds that the alignment allows
(``fxadapt.planning.align``: multiples of ``lcm(align, granularity) / granularity``, plus ``N_g``).
``M(n)`` is the cost model's MAC polynomial (``fxadapt.analysis.cost``), ``T`` the target.

1. **Scale.** ``n_g(s)`` = the rung of ``R_g`` nearest to ``s * b_g`` (``b`` = the original widths for the
   data-free solver, the searched widths for DNA/FUR). ``M(n(s))`` is non-decreasing in ``s``, so bisection
   finds the largest ``s`` with ``M <= T`` (shrink) or the smallest with ``M >= T`` (grow).
2. **Repair.** While ``M`` is outside the window ``W = [(1 - tol) T, T]`` (shrink) or ``[T, (1 + tol) T]``
   (grow), take the smallest one-rung move (up when shrinking, down when growing) that does not cross
   ``T``; when none fits, the swap landing closest to ``T``. Steps 1 and 2 are ``fxadapt.planning.scale``
   (shared with the latency solver); here every round's candidates are evaluated at once: with factor values
   ``V = c + F n`` (one row per linear form) a move of group ``g`` by ``dn`` adds ``dn * F[:, g]``, and
   ``M = sum_t coef_t * prod_{j in t} V_j`` (``fxadapt.planning.poly.MacsPoly``).
3. **Verdict.** In ``W``: done. Otherwise the groups are too coarse (or too coarsely aligned) for ``W``:
   ``strict`` raises ``BudgetError`` with the nearest totals found on both sides of ``T``; else the closest on
   the right side (never above when shrinking, never below when growing) is returned with a
   ``BudgetWarning`` saying how far it is.

A target outside ``[M(lowest rungs), M(highest rungs)]`` is a ``BudgetError`` stating that range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fxadapt.errors import BudgetError, BudgetWarning, warn
from fxadapt.planning.align import Ladders, ladder, resolve_align
from fxadapt.planning.plan import growth_blocker
from fxadapt.planning.poly import MacsPoly
from fxadapt.planning.refusals import floor_note, growth_note
from fxadapt.planning.scale import Aim, approach, bisect

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis
    from fxadapt.analysis.groups import Group

TOL = 0.01
_EXHAUSTIVE = 200_000  # at most this many assignments: try them all when the greedy repair misses


@dataclass(frozen=True)
class SolveConfig:
    """Solver options: ``min_ratio`` (narrowest kept fraction of a group), ``max_expand`` (widest growth),
    ``tol`` (relative width of the budget window), ``strict`` (raise instead of warning when no widths lie in
    the window), ``align`` (every adapted width a multiple of ``lcm(align, granularity)``; ``"auto"`` =
    ``auto_align("cpu")``), ``preserve`` (growth only where it is function-preserving; ``False`` also
    widens groups a norm or reduction averages over: the new channels start at zero, the function changes,
    and ``transform`` reports by how much).

    >>> SolveConfig(align=8).alignment(), SolveConfig(align="auto").alignment() in (4, 8, 16)
    (8, True)
    """

    min_ratio: float = 0.1
    max_expand: float = 4.0
    tol: float = TOL
    strict: bool = False
    align: int | str = 1
    preserve: bool = True

    def __post_init__(self):
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not 0 <= self.tol < 1:
            raise BudgetError(f"SolveConfig.tol must be a fraction in [0, 1), got {self.tol!r}")
        resolve_align(self.align)

    def alignment(self) -> int:
        return resolve_align(self.align)


def in_window(macs: float, target: float, grow: bool, tol: float = TOL) -> bool:
    """``[T, (1 + tol) T]`` when growing, ``[(1 - tol) T, T]`` when shrinking.

    >>> in_window(995, 1000, False), in_window(1001, 1000, False), in_window(1009, 1000, True, tol=0.01)
    (True, False, True)
    """
    return target <= macs <= target * (1 + tol) if grow else target * (1 - tol) <= macs <= target


class _Problem:
    """The free groups' ladders, the polynomial and the target: ``x(idx)`` is the full assignment row."""

    def __init__(self, poly: MacsPoly, lad: Ladders, target: float):
        self.poly, self.lad, self.target = poly, lad, target
        self.cols = np.array([poly.col[g] for g in lad.gids], dtype=np.int64)
        self.size, self.off, self.flat = lad.size, lad.off, lad.flat

    def x(self, idx: np.ndarray) -> np.ndarray:
        x = self.poly.base.copy()
        x[self.cols] = self.lad.values(idx)
        return x


def group_ladder(g: Group, bounds: tuple[int, int], align: int):
    """A group's rungs; whole experts are no SIMD width: an expert axis is never aligned."""
    return ladder(g.units, g.granularity, *bounds, align if g.top_k is None else 1)


def ladder_problem(a: Analysis, target: float, bounds: dict, base: dict, cfg: SolveConfig,
                   present=None) -> _Problem:
    align, gids = cfg.alignment(), sorted(bounds)
    rungs = [group_ladder(a.groups[g], bounds[g], align) for g in gids]
    lad = Ladders(gids, rungs, np.array([max(base[g], 1) for g in gids], dtype=float))
    return _Problem(MacsPoly(a.cost, present), lad, target)


class _MacCost:
    """``M`` over rung indices for ``fxadapt.planning.scale``: every candidate of a round in one product."""

    def __init__(self, p: _Problem):
        self.p = p

    def total(self, idx: np.ndarray) -> float:
        return float(self.p.poly(self.p.x(idx)[None])[0])

    def singles(self, idx: np.ndarray, ks: np.ndarray, d: int) -> np.ndarray:
        p = self.p
        return p.poly.singles(p.x(idx), p.cols[ks], p.flat[p.off[ks] + idx[ks] + d])

    def pairs(self, idx: np.ndarray, fwd: np.ndarray, back: np.ndarray, d: int) -> np.ndarray:
        p = self.p
        return p.poly.pairs(p.x(idx), p.cols[fwd], p.flat[p.off[fwd] + idx[fwd] + d],
                            p.cols[back], p.flat[p.off[back] + idx[back] - d])


def _scaled(p: _Problem, above: bool, tol: float | None) -> np.ndarray:
    """Steps 1 and 2 of the module docstring (``fxadapt.planning.scale``): ``tol=None`` = as close as it
    gets."""
    cost = _MacCost(p)
    ok = (lambda i: cost.total(i) >= p.target) if above else (lambda i: cost.total(i) <= p.target)
    done = None if tol is None else (lambda m: in_window(m, p.target, above, tol))
    return approach(p.lad, cost, bisect(p.lad, ok, above), Aim(p.target, above, done))


def _exhaustive(p: _Problem, near: np.ndarray, above: bool, tol: float | None):
    """Every assignment of a small problem: in the window, the one nearest ``near`` in log-width; else the
    closest to ``T`` on the right side. None when too many or none on the right side."""
    if not p.size.size or np.prod(p.size.astype(float)) > _EXHAUSTIVE:
        return None
    grid = np.stack(np.meshgrid(*[np.arange(k) for k in p.size], indexing="ij"), -1).reshape(-1, p.size.size)
    vals = np.stack([r[grid[:, k]] for k, r in enumerate(p.lad.rungs)], 1).astype(float)
    X = np.repeat(p.poly.base[None], len(grid), 0)
    X[:, p.cols] = vals
    m, t = p.poly(X), p.target
    side = m >= t if above else m <= t
    if not side.any():
        return None
    ok = side & (m <= t * (1 + tol) if above else m >= t * (1 - tol)) if tol is not None else side & False
    if ok.any():
        dist = np.abs(np.log(vals / p.x(near)[p.cols])).sum(1)
        return grid[int(np.argmin(np.where(ok, dist, np.inf)))]
    return grid[int(np.argmin(np.where(side, np.abs(m - t), np.inf)))]


def _solve(p: _Problem, above: bool, tol: float | None) -> np.ndarray:
    """Scale, repair, and when the repair misses the window a full search of small problems."""
    idx = _scaled(p, above, tol)
    m = p.poly(p.x(idx)[None])[0]
    if tol is not None and in_window(m, p.target, above, tol):
        return idx
    alt = _exhaustive(p, idx, above, tol)
    if alt is None:
        return idx
    m_alt = p.poly(p.x(alt)[None])[0]
    return alt if abs(m_alt - p.target) < abs(m - p.target) or (m >= p.target) != above else idx


def unit_bounds(a: Analysis, grow: bool, cfg: SolveConfig) -> dict[int, tuple[int, int]]:
    """Units each prunable group may keep, shrinking or growing, within the user's ``min_units`` /
    ``max_units`` (``fxadapt.analysis.hold``)."""
    out = {}
    for g in a.prunable:
        lo = max(1, g.top_k or 1, math.ceil(cfg.min_ratio * g.units))   # experts: at least top_k stay
        if grow:
            if growth_blocker(a, g, cfg.preserve) is None:
                out[g.id] = limited(g, g.units, max(g.units, int(cfg.max_expand * g.units)))
        else:
            out[g.id] = limited(g, min(lo, g.units), g.units)
    return out


def limited(g: Group, lo: int, hi: int) -> tuple[int, int]:
    """``(lo, hi)`` within the group's ``min_units`` / ``max_units`` (a minimum never above ``hi``; a maximum
    wins over the solver's floor).

    >>> from types import SimpleNamespace as G
    >>> limited(G(min_units=6, max_units=None), 2, 8), limited(G(min_units=None, max_units=3), 4, 8)
    ((6, 8), (3, 3))
    """
    if g.min_units is not None:
        lo = min(max(lo, g.min_units), hi)
    if g.max_units is not None:
        hi = min(hi, g.max_units)
        lo = min(lo, hi)
    return lo, hi


def reachable(a: Analysis, cfg: SolveConfig = SolveConfig()) -> tuple[float, float]:
    """MACs at the narrowest and widest (aligned) widths the solver may use.

    >>> import torch, fxadapt
    >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 20, 1), torch.nn.Conv2d(20, 4, 1)),
    ...                     (torch.randn(1, 3, 1, 1),))
    >>> reachable(a, SolveConfig(max_expand=2.0)), reachable(a, SolveConfig(align=8, max_expand=2.0))
    ((14.0, 280.0), (56.0, 280.0))
    """
    return _reach(a, cfg, unit_bounds(a, False, cfg), unit_bounds(a, True, cfg))


def _reach(a: Analysis, cfg: SolveConfig, shrink: dict, grow: dict) -> tuple[float, float]:
    align = cfg.alignment()
    lo = {g: int(group_ladder(a.groups[g], b, align)[0]) for g, b in shrink.items()}
    hi = {g: int(group_ladder(a.groups[g], b, align)[-1]) for g, b in grow.items()}
    return a.cost.macs(lo), a.cost.macs(hi)


def fit(a: Analysis, target: float, bounds: dict, base: dict, grow: bool, cfg: SolveConfig = SolveConfig(),
        present: dict | None = None) -> dict[int, int]:
    """Scale ``base`` widths by one factor within ``bounds`` (on ``cfg``'s aligned ladders), then repair
    toward the window ``[T, (1 + tol) T]`` (``grow``) or ``[(1 - tol) T, T]``; ``present`` fixes block
    presences (after a depth search). The result may miss the window; ``check_window`` gives the verdict.

    >>> import torch, fxadapt
    >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 20, 1), torch.nn.Conv2d(20, 4, 1)),
    ...                     (torch.randn(1, 3, 1, 1),))
    >>> fit(a, 70.0, {0: (1, 20)}, {0: 20}, grow=False)          # 7 MACs per unit of group 0
    {0: 10}
    """
    p = ladder_problem(a, target, bounds, base, cfg, present)
    return p.lad.units(_solve(p, grow, cfg.tol))


def _side(m: float, target: float, base: float) -> str:
    where = "above" if m > target else "below"
    return f"{m:,.0f} ({m / base:.3f}x, {abs(m - target) / target:.1%} {where})"


def counted(a: Analysis) -> str:
    """What ``a.cost.macs`` counts, as messages name it: "MACs", or "parameters" for a params solve
    (``Analysis.params_as_macs``)."""
    return getattr(a, "counting", "MACs")


def _coarse(a: Analysis, align: int) -> str:
    share, what = ("params_share", "params") if counted(a) == "parameters" else ("macs_share", "MACs")
    top = sorted(a.prunable, key=lambda g: -getattr(g, share, 0.0))[:2]
    aligned = f" for widths aligned to {align}" if align > 1 else ""
    return f"the groups are too coarse{aligned}: " + ", ".join(
        f"{g.name} has {g.units} units ({what} elasticity {getattr(g, share, 0.0):.2f})" for g in top)


def check_window(a: Analysis, n: dict, target: float, grow: bool, cfg: SolveConfig = SolveConfig(),
                 present: dict | None = None, base: float | None = None) -> float:
    """MACs of ``n``; when they miss the window: a ``BudgetWarning`` saying how far, or with ``cfg.strict`` a
    ``BudgetError`` naming the nearest totals found on both sides of ``target`` (module docstring, step 3).
    Ratios in the message are of ``base`` (default: ``a``'s own MACs; a search passes the original model's,
    since ``a`` is then its grown supernet).

    >>> import torch, fxadapt
    >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 20, 1), torch.nn.Conv2d(20, 4, 1)),
    ...                     (torch.randn(1, 3, 1, 1),))
    >>> check_window(a, {0: 10}, 70.0, grow=False)
    70.0
    """
    m, t, base = a.cost.macs(n, present), target, base or a.cost.macs()
    if in_window(m, t, grow, cfg.tol):
        return m
    note = _coarse(a, cfg.alignment())
    if cfg.strict:
        bounds = unit_bounds(a, grow, cfg)
        bounds = {g: bounds.get(g, (v, v)) for g, v in n.items()}
        p = ladder_problem(a, t, bounds, {g: a.groups[g].units for g in bounds}, cfg, present)
        found = (m, a.cost.macs(p.lad.units(_solve(p, not grow, None)), present))
        below, above = [v for v in found if v <= t], [v for v in found if v >= t]
        near = (f"{_side(max(below), t, base) if below else 'none below'} and "
                f"{_side(min(above), t, base) if above else 'none above'}")
        raise BudgetError(f"no widths within {cfg.tol:.0%} of the budget of {t:,.0f} {counted(a)} "
                          f"({t / base:.3f}x): the nearest feasible totals are {near}; {note}; "
                          "SolveConfig(strict=False) takes the closest "
                          f"{'at or above' if grow else 'at or below'} the budget")
    warn(BudgetWarning(
        f"{counted(a)} landed at {m / base:.3f}x for a budget of {t / base:.3f}x: {abs(m - t) / t:.1%} "
        f"{'above' if grow else 'below'}, outside the {cfg.tol:.0%} window; {note}; SolveConfig(strict=True) "
        f"refuses instead"))
    return m


def checked_bounds(a: Analysis, target: float, cfg: SolveConfig) -> dict[int, tuple[int, int]]:
    """Bounds for ``target``'s direction, after checking that ``target`` is in the reachable range (growth
    bounds, whose blockers are slow to find, only when they matter)."""
    base = a.cost.macs()
    shrink = unit_bounds(a, False, cfg)
    growth = unit_bounds(a, True, cfg) if target > base else None
    lo_r = _reach(a, cfg, shrink, {})[0]
    hi_r = _reach(a, cfg, {}, growth)[1] if growth is not None else base
    if lo_r * (1 - 1e-9) <= target <= hi_r * (1 + 1e-9):
        return shrink if growth is None else growth
    lo_r, hi_r = _reach(a, cfg, shrink, unit_bounds(a, True, cfg) if growth is None else growth)
    align = cfg.alignment()
    aligned = f", widths aligned to {align}" if align > 1 else ""
    what = counted(a)
    raise BudgetError(
        f"budget of {target:,.0f} {what} ({target / base:.3f}x) is outside the reachable range "
        f"[{lo_r:,.0f}, {hi_r:,.0f}] {what} = [{lo_r / base:.3f}x, {hi_r / base:.3f}x] of the original "
        f"{base:,.0f} (min width {cfg.min_ratio:.0%} of each group, growth up to {cfg.max_expand}x{aligned})"
        + (growth_note(a) if target > base else floor_note(a)))


def solve_widths(a: Analysis, target: float, cfg: SolveConfig = SolveConfig()) -> dict[int, int]:
    """Kept units per prunable group so that MACs land within ``cfg.tol`` of ``target`` on its right side
    (never above when shrinking, never below when growing), every adapted width aligned to ``cfg.align``.
    When the groups are too coarse for the window: the closest on the right side with a ``BudgetWarning``,
    or a ``BudgetError`` naming the nearest totals when ``cfg.strict``.

    >>> import torch, fxadapt
    >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 32, 1), torch.nn.Conv2d(32, 4, 1)),
    ...                     (torch.randn(1, 3, 1, 1),))
    >>> solve_widths(a, 0.5 * a.macs()), solve_widths(a, 0.5 * a.macs(), SolveConfig(align=8))
    ({0: 16}, {0: 16})
    """
    bounds = checked_bounds(a, target, cfg)
    grow = target > a.cost.macs()
    p = ladder_problem(a, target, bounds, {g: a.groups[g].units for g in bounds}, cfg)
    n = p.lad.units(_solve(p, grow, cfg.tol))
    check_window(a, n, target, grow, cfg)
    return n
