"""The measure-and-re-aim loop of a latency solve (``fxadapt.planning.latency``, "Repair").

Every attempt solves widths for a *predicted* target ``T'`` (``fxadapt.planning.scale``: bisection on the
global scale for the largest assignment predicted at most ``T'`` with the MAC/params limits held, then the
one-rung moves landing closest to ``T'``) and measures them end to end. The window is ``[(1 - tol) T, T]``
and the aim ``A = (1 - tol / 2) T``. The first attempt uses ``T' = A`` and its measurement calibrates the
model once; then, on the fixed model, ``T' <- T' (A / m)^k`` while the measurements lie on one side of the
window, and the secant between the nearest measurements below and above toward ``A`` (then points spread
over that bracket) once they lie on both. Widths already measured move on to the next ``T'``; when none is
new, one rung up from the best measurement below the window (the untried move predicted cheapest). When a
MAC budget binds first (one rung wider is predicted under ``T'`` but breaks it) the MAC solver's exact
widths are measured instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fxadapt.planning.scale import Aim, LoopCost, approach, bisect
from fxadapt.planning.solver import SolveConfig, solve_widths

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis
    from fxadapt.planning.latency import LatencyModel


def _widths_for(p, lm: LatencyModel, Tp: float, macs_ok: Callable) -> np.ndarray:
    """Rungs whose predicted latency is at most ``Tp`` and within 1% of it where the ladders allow, MAC and
    params budgets held (``fxadapt.planning.scale``: bisection, then the move landing closest to ``Tp``)."""
    ok = lambda i: macs_ok(p.lad.units(i))
    cost = LoopCost(lambda i: lm.predict(p.lad.units(i)), ok)
    start = bisect(p.lad, lambda i: cost.total(i) <= Tp and ok(i))
    return approach(p.lad, cost, start, Aim(Tp, done=lambda t: t >= 0.99 * Tp, pick="closest"))


def _targets(lm: LatencyModel, history: list, T: float, tol: float) -> list[float]:
    """Predicted-latency targets ``T'`` for the next attempt, in the order to try them (module docstring):
    between the nearest measurements below the window and above ``T`` the secant toward ``A``, then points
    spread over that bracket; on one side only, ``T'`` scaled on by ``A / m`` step by step."""
    aim = (1 - tol / 2) * T
    below = [h for h in history if h["measured"] < (1 - tol) * T]
    above = [h for h in history if h["measured"] > T]
    lo = max(below, key=lambda h: h["measured"]) if below else None
    hi = min(above, key=lambda h: h["measured"]) if above else None
    if lo is None or hi is None:
        h = cast(dict, lo or hi)      # the history is never empty here
        step = aim / h["measured"]
        return [lm.predict(h["units"]) * step ** k for k in (1, 2, 3, 4)]
    (t0, m0), (t1, m1) = ((lm.predict(h["units"]), h["measured"]) for h in (lo, hi))
    if t1 <= t0:                         # the model orders them the other way: only the spread
        return [t0 + f * (t1 - t0) for f in (0.5, 0.25, 0.75)]
    t = t0 + (aim - m0) * (t1 - t0) / max(m1 - m0, 1e-12)
    return [min(max(t, t0), t1)] + [t0 + f * (t1 - t0) for f in (0.5, 0.25, 0.75, 0.9)]


@dataclass
class RepairState:
    """One latency solve's state: the analysis and its ladder problem ``p``, the latency model, the budget
    ``T`` (seconds) and its window ``tol``, the MAC limit ``macs_t`` (a count, ``inf`` when none) with the
    config the exact MAC solve runs at, ``macs_ok(units)`` (MAC and params limits held), every measurement
    so far (``history``) and the assignments measured (``tried``, as sorted item tuples)."""

    a: Analysis
    p: Any
    lm: LatencyModel
    T: float
    tol: float
    macs_t: float
    cfg: SolveConfig
    macs_ok: Callable
    history: list
    tried: set = field(default_factory=set)


def repairs(s: RepairState, measure: Callable, max_repairs: int):
    """Measure, calibrate once, re-aim (module docstring), at most ``max_repairs`` times after the first
    attempt; the best measurement at or below ``T`` as ``(units, seconds, binding)``, or None."""
    T, tol = s.T, s.tol
    best, plans = None, [(1 - tol / 2) * T]
    for attempt in range(max_repairs + 1):
        n, binding, Tp = _next_units(s, plans)
        if n is None:
            # nothing untried between the measurements: the ladders are too coarse
            break
        s.tried.add(tuple(sorted(n.items())))
        pred, m = s.lm.predict(n), float(measure(n))
        s.history.append({"units": n, "predicted": pred, "measured": m, "binding": binding, "aim": Tp})
        if m <= T and (best is None or m > best[1]):
            best = (n, m, binding)
        if m <= T and (binding == "macs" or m >= (1 - tol) * T):
            break
        # the table's scale, once; then the target is searched on a fixed model
        if attempt == 0:
            s.lm.calibrate(n, m)
        plans = ([(1 - tol / 2) * T] if attempt == 0 else []) + _targets(s.lm, s.history, T, tol)
    return best


def _next_units(s: RepairState, plans: list[float]) -> tuple[dict | None, str, float]:
    """The widths to measure next, with what binds them and the predicted target aimed at: those of the
    first target in ``plans`` whose widths were not measured yet, else one rung up (``_step_up``; None when
    nothing is left to try)."""
    Tp = math.nan
    for Tp in plans:
        n, binding = _attempt(s, Tp)
        if tuple(sorted(n.items())) not in s.tried:
            return n, binding, Tp
    return _step_up(s), "latency", Tp


def _attempt(s: RepairState, Tp: float) -> tuple[dict, str]:
    """The widths for predicted target ``Tp``; the MAC solver's exact widths when a MAC budget binds first
    (one rung wider would still be predicted under ``Tp`` but breaks the MAC budget)."""
    p = s.p
    idx = _widths_for(p, s.lm, Tp, s.macs_ok)
    up = np.minimum(idx + 1, p.size - 1)
    if math.isfinite(s.macs_t) and s.lm.predict(p.lad.units(up)) <= Tp and not s.macs_ok(p.lad.units(up)):
        return solve_widths(s.a, s.macs_t, s.cfg), "macs"
    return p.lad.units(idx), "latency"


def _step_up(s: RepairState) -> dict | None:
    """When no target gives new widths (a table too coarse or too noisy to tell them apart): one rung up from
    the best measurement below the window, the untried move predicted cheapest (measured next), or None."""
    p = s.p
    below = [h for h in s.history if h["measured"] < (1 - s.tol) * s.T]
    if not below:
        return None
    start = max(below, key=lambda h: h["measured"])["units"]
    idx = np.array([int(np.searchsorted(r, start[g])) for g, r in zip(p.lad.gids, p.lad.rungs)])
    moves = []
    for k in np.flatnonzero(idx + 1 < p.size):
        cand = idx.copy()
        cand[k] += 1
        n = p.lad.units(cand)
        if tuple(sorted(n.items())) not in s.tried and s.macs_ok(n):
            moves.append((s.lm.predict(n), n))
    return min(moves, key=lambda m: m[0])[1] if moves else None
