"""Budgets and the data-free width solver.

A budget is a MAC (and optionally parameter) target. ``parse_budget`` accepts a float (fraction of the
original MACs: 0.5 halves, 1.5 grows), a string (``"50%"``, ``"300M"``, ``"1.2G"`` MACs) or
``Budget(macs=..., params=...)`` whose numbers are fractions when at most ``FRACTION_MAX`` and absolute
counts otherwise.

Solver: every prunable group (growable ones when growing) is scaled by one factor ``s``:
``n_g = clip(round(s * N_g), n_min_g, n_max_g)``, with ``n_min_g = max(1, ceil(min_ratio * N_g))`` and
``n_max_g = N_g`` when shrinking, ``max_expand * N_g`` when growing. MACs are monotone in ``s``, so
bisection finds the largest ``s`` with MACs <= T (shrink) or the smallest with MACs >= T (grow); then a
greedy repair adds (shrink) or removes (grow) single units, cheapest first by the cost model's gradient,
while staying on the right side of T, until MACs lie in [0.99 T, T] (shrink) or [T, 1.01 T] (grow).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fxadapt.errors import BudgetError
from fxadapt.planning.plan import growth_blocker

FRACTION_MAX = 16.0
TOL = 0.01
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


@dataclass(frozen=True)
class Budget:
    """A compute target: ``macs`` (and/or ``params``), fractions if <= 16, absolute counts otherwise.

    >>> Budget(macs=0.5).resolve(1e9, 1e6)
    Budget(macs=500000000.0, params=None)
    """

    macs: float | None = None
    params: float | None = None

    def resolve(self, base_macs: float, base_params: float) -> Budget:
        return Budget(_absolute(self.macs, base_macs, "macs"), _absolute(self.params, base_params, "params"))


def _number(v, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BudgetError(f"budget {what} must be a number, got {type(v).__name__} {v!r}")
    if not math.isfinite(v) or v <= 0:
        raise BudgetError(f"budget {what} must be a finite number > 0, got {v!r}")
    return float(v)


def _absolute(v, base: float, what: str) -> float | None:
    if v is None:
        return None
    v = _number(v, what)
    return v * base if v <= FRACTION_MAX else v


def parse_budget(budget, base_macs: float, base_params: float) -> Budget:
    """Absolute targets from any accepted budget form (see module docstring).

    >>> parse_budget("50%", 2e9, 1e6).macs, parse_budget("300M", 2e9, 1e6).macs, parse_budget(1.5, 2e9, 1e6).macs
    (1000000000.0, 300000000.0, 3000000000.0)
    """
    if isinstance(budget, Budget):
        if budget.macs is None and budget.params is None:
            raise BudgetError("Budget needs macs= or params=")
        return budget.resolve(base_macs, base_params)
    if isinstance(budget, str):
        text = budget.strip().upper().replace(" ", "")
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+)%", text):
            return Budget(_number(float(m.group(1)) / 100, "percentage") * base_macs)
        if m := re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)([KMGT]?)(?:MACS?)?", text):
            value = _number(float(m.group(1)), "string")
            return Budget(value * _SUFFIX[m.group(2)] if m.group(2) or value > FRACTION_MAX else value * base_macs)
        raise BudgetError(f"cannot read budget {budget!r}: use a fraction (0.5), a percentage ('50%') "
                          f"or MACs with a suffix ('300M', '1.2G')")
    return Budget(_number(budget, "fraction") * base_macs)


@dataclass(frozen=True)
class SolveConfig:
    min_ratio: float = 0.1
    max_expand: float = 4.0
    tol: float = TOL


def _bounds(a, grow: bool, cfg: SolveConfig) -> dict[int, tuple[int, int]]:
    out = {}
    for g in a.prunable:
        lo = max(1, math.ceil(cfg.min_ratio * g.units))
        if grow:
            if growth_blocker(a, g) is None:
                out[g.id] = (g.units, max(g.units, int(cfg.max_expand * g.units)))
        else:
            out[g.id] = (min(lo, g.units), g.units)
    return out


def reachable(a, cfg: SolveConfig = SolveConfig()) -> tuple[float, float]:
    """MACs at the narrowest and widest widths the solver may use."""
    lo = {g: b[0] for g, b in _bounds(a, False, cfg).items()}
    hi = {g: b[1] for g, b in _bounds(a, True, cfg).items()}
    return a.cost.macs(lo), a.cost.macs(hi)


def _scaled(bounds: dict, units: dict, s: float) -> dict[int, int]:
    return {g: min(max(round(s * units[g]), lo), hi) for g, (lo, hi) in bounds.items()}


def solve_widths(a, target: float, cfg: SolveConfig = SolveConfig()) -> dict[int, int]:
    """Kept units per group so MACs land within ``cfg.tol`` of ``target`` on its right side."""
    base = a.cost.macs()
    lo_r, hi_r = reachable(a, cfg)
    if not lo_r * (1 - 1e-9) <= target <= hi_r * (1 + cfg.tol):
        raise BudgetError(
            f"budget of {target:,.0f} MACs ({target / base:.3f}x) is outside the reachable range "
            f"[{lo_r:,.0f}, {hi_r:,.0f}] MACs = [{lo_r / base:.3f}x, {hi_r / base:.3f}x] of the original "
            f"{base:,.0f} (min width {cfg.min_ratio:.0%} of each group, growth up to {cfg.max_expand}x)")
    grow = target > base
    bounds = _bounds(a, grow, cfg)
    n = fit(a, target, bounds, {g: a.groups[g].units for g in bounds}, grow, cfg)
    _check_window(a, n, target, grow, cfg)
    return n


def _check_window(a, n: dict, target: float, grow: bool, cfg: SolveConfig) -> None:
    """Raise ``BudgetError`` when no width assignment found lies in the window: the groups are too coarse."""
    m = a.cost.macs(n)
    if (target <= m <= target * (1 + cfg.tol)) if grow else (target * (1 - cfg.tol) <= m <= target):
        return
    base = a.cost.macs()
    coarse = sorted(a.prunable, key=lambda g: -g.macs_share)[:2]
    raise BudgetError(
        f"no widths within {cfg.tol:.0%} of the budget of {target:,.0f} MACs ({target / base:.3f}x): the closest "
        f"{'at or above' if grow else 'at or below'} it is {m:,.0f} ({m / base:.3f}x); the prunable groups are "
        f"too coarse: " + ", ".join(f"{g.name} has {g.units} units for {g.macs_share:.0%} of the MACs" for g in coarse))


def fit(a, target: float, bounds: dict, base: dict, grow: bool, cfg: SolveConfig = SolveConfig(),
        present: dict | None = None) -> dict[int, int]:
    """Scale ``base`` widths by one factor (bisection) within ``bounds``, then repair to the window:
    [T, 1.01 T] when ``grow``, else [0.99 T, T]. ``present`` fixes block presences (after a depth search)."""
    s_max = max(hi / max(base[g], 1) for g, (_, hi) in bounds.items()) if bounds else 1.0
    lo_s, hi_s = 0.0, max(s_max, 1.0)
    for _ in range(50):
        mid = (lo_s + hi_s) / 2
        m = a.cost.macs(_scaled(bounds, base, mid), present)
        ok = m >= target if grow else m <= target
        lo_s, hi_s = (lo_s, mid) if ok == grow else (mid, hi_s)
    n = _scaled(bounds, base, hi_s if grow else lo_s)
    return _repair(a, n, bounds, target, grow, cfg, present)


def _repair(a, n: dict, bounds: dict, target: float, grow: bool, cfg: SolveConfig,
            present: dict | None = None) -> dict[int, int]:
    """Greedy unit moves toward the target, never crossing it: single steps (cheapest first), then swaps
    (one unit up in a group, one down in another) when no single step fits the window."""
    step = -1 if grow else 1
    for _ in range(10_000):
        m = a.cost.macs(n, present)
        if (grow and m <= target * (1 + cfg.tol)) or (not grow and m >= target * (1 - cfg.tol)):
            return n
        order = sorted(bounds, key=lambda g: abs(a.cost.macs_grad(g, n)))
        moves = [{g: step} for g in order] + [{g: step, h: -step} for g in order for h in order if g != h]
        best = None
        for mv in moves:
            trial = {**n, **{g: n[g] + d for g, d in mv.items()}}
            if not all(bounds[g][0] <= trial[g] <= bounds[g][1] for g in mv):
                continue
            mt = a.cost.macs(trial, present)
            if ((grow and target <= mt < m) or (not grow and m < mt <= target)):
                best = trial
                break
        if best is None:
            return n
        n = best
    return n
