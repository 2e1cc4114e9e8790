"""Parameter budgets, alone and together with a MAC budget.

Notation: ``n`` kept units per group, ``M(n)`` MACs and ``P(n)`` parameters (cost-model polynomials with
non-negative coefficients, so non-decreasing in every ``n_g``), targets ``M_T`` and ``P_T``, window
``[(1 - tol) P_T, P_T]``. Channel groups move MACs and parameters; expert groups (whole experts,
``Analysis.experts``) move parameters and, under top-k routing, only the router's ``T * H`` MACs per expert.

- ``params=`` alone (``params_only``): the width solver on ``P`` (``Analysis.params_as_macs``: experts
  move too, at least ``top_k`` each).
- ``macs=`` and ``params=`` (``with_params``): ``n_M`` is the MAC solve (experts kept). If ``P(n_M) <= P_T``
  the MACs bind and ``n_M`` is the plan. Otherwise the parameters bind, and no width exceeds ``n_M``, so
  ``M(n) <= M(n_M) <= M_T``:

  1. experts alone, channels at ``n_M``: experts removed until ``P`` is in its window (the MACs lose only
     router rows);
  2. where experts alone cannot (at ``top_k`` experts ``P`` is still above ``P_T``, or experts are too
     coarse for the window): candidates solved on ``P`` within ``[lo_g, n_M[g]]``, scaled down from
     ``n_M``: every group together, and for every expert count ``k`` from ``top_k`` to ``E`` (all expert
     groups at ``k``) the channels alone; of those in the window the one with the most MACs (the MAC
     budget used as far as the parameters allow), else the closest below ``P_T``.

  ``P_T`` below ``P`` at the narrowest widths is a ``BudgetError`` naming the reachable parameters
  ``[P(lo), P(n_M)]`` at that MAC budget. A MAC budget that grows the model is a floor on the MACs, which a
  params budget below ``P(n_M)`` contradicts (widths can only grow): a ``BudgetError`` too.

Example:
    >>> import torch, fxadapt
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 1),
    ...                           torch.nn.ReLU(), torch.nn.Conv2d(32, 4, 1))
    >>> small = fxadapt.transform(net, fxadapt.Budget(macs=0.8, params=0.4), (torch.randn(1, 3, 8, 8),))
    >>> r = fxadapt.report(small)
    >>> r.macs_after <= 0.8 * r.macs_before, 0.99 * 0.4 <= r.params_after / r.params_before <= 0.4
    (True, True)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fxadapt.analysis.cost import CostModel
from fxadapt.errors import BudgetError
from fxadapt.planning.solver import SolveConfig, check_window, fit, group_ladder, in_window, unit_bounds
from fxadapt.planning.uniform import shared_widths

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis
    from fxadapt.pipeline.job import Job


def params_only(job: Job, solve) -> tuple[dict[int, int], int, float]:
    """A params budget alone: ``solve(view, target, SolveConfig) -> (widths, alignment)`` on the parameter
    count. Returns the widths, the alignment and the parameter count they reach."""
    view = job.analysis.params_as_macs()
    units, align = solve(view, job.goal.params, job.cfg.solve)
    return units, align, view.macs(units=units)


def with_params(job: Job, a: Analysis, units: dict[int, int],
                cfg: SolveConfig) -> tuple[dict[int, int], float | None]:
    """The MAC solve's ``units`` (solved with ``cfg``, its alignment) brought under the params budget too
    (module docstring); the widths and, where the parameters bind, the parameter count reached (None where
    the MACs bind)."""
    target, goal = job.goal.params, job.goal
    if a.params(units=units) <= target * (1 + 1e-9):
        return units, None
    if goal.macs > a.macs():
        raise BudgetError(f"growing to {goal.macs:,.0f} MACs takes {a.params(units=units):,.0f} parameters, "
                          f"above the params budget of {target:,.0f}: give a larger params= or a MAC budget "
                          "below 1.0x")
    view, align = a.params_as_macs(), cfg.alignment()
    caps = {g: (lo, max(lo, min(hi, units.get(g, hi))))
            for g, (lo, hi) in unit_bounds(view, False, cfg).items()}
    lowest = view.cost.macs({g: int(group_ladder(a.groups[g], b, align)[0]) for g, b in caps.items()})
    if target < lowest * (1 - 1e-9):
        base = a.params()
        raise BudgetError(f"at the MAC budget of {goal.macs:,.0f} the reachable parameters are "
                          f"[{lowest:,.0f}, {a.params(units=units):,.0f}] = [{lowest / base:.3f}x, "
                          f"{a.params(units=units) / base:.3f}x] of the original {base:,.0f}; the params "
                          f"budget of {target:,.0f} ({target / base:.3f}x) is below: give a larger params=")
    problem = _Problem(view, units, target, cfg, caps, job.cfg.layers == "uniform")
    n = _experts_alone(problem)
    if n is None:
        n = _together(a, problem)
    check_window(view, n, target, False, cfg, base=a.params())
    return n, view.macs(units=n)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """What steps 1 and 2 solve (module docstring): on ``view`` (the parameters as MACs, ``P``) to
    ``target`` (``P_T``), from the MAC solve's ``units`` (``n_M``), every group within its ``caps``
    (``[lo_g, n_M[g]]``), with the solve's ``cfg``; ``uniform``: one width ratio for every layer."""

    view: Analysis
    units: dict
    target: float
    cfg: SolveConfig
    caps: dict
    uniform: bool


def _experts_alone(problem: _Problem) -> dict | None:
    """Step 1: channels at ``units``, experts solved on the parameters; None when that misses the window."""
    view, units, target, cfg, caps = problem.view, problem.units, problem.target, problem.cfg, problem.caps
    experts = {e.id: caps[e.id] for e in view.experts if e.id in caps}
    if not experts:
        return None
    at = _fixed(view, units)
    if at.cost.macs({e: int(group_ladder(view.groups[e], b, cfg.alignment())[0])
                     for e, b in experts.items()}) \
            > target:
        return None
    n = fit(at, target, experts, {e: view.groups[e].units for e in experts}, False, cfg)
    if problem.uniform:
        n = shared_widths(at, n, target, cfg, experts)[0]
    n = {**units, **n}
    return n if in_window(view.macs(units=n), target, False, cfg.tol) else None


def _together(a: Analysis, problem: _Problem) -> dict:
    """Step 2: every group solved on the parameters within its caps, scaled down from ``units``, and for each
    expert count ``k`` (every expert group at ``k`` within its bounds) the channels alone; the candidate in
    the window with the most MACs, else the one closest below ``P_T``."""
    view, units, target, cfg, caps = problem.view, problem.units, problem.target, problem.cfg, problem.caps
    experts = [e for e in view.experts if e.id in caps]
    channels = {g: b for g, b in caps.items() if view.groups[g].top_k is None}
    ks = range(min((caps[e.id][0] for e in experts), default=0),
               max((e.units for e in experts), default=0) + 1)
    found = []
    for k in [None, *ks] if experts else [None]:   # None: experts scaled with the channels
        ek = {} if k is None else {e.id: min(max(k, caps[e.id][0]), caps[e.id][1]) for e in experts}
        free = caps if k is None else channels
        at = _fixed(view, {**units, **ek})
        n = fit(at, target, free, {g: units.get(g, view.groups[g].units) for g in free}, False, cfg)
        if problem.uniform:
            n = shared_widths(at, {**units, **n}, target, cfg, free)[0]
        cand = {**units, **n, **ek}
        found.append((view.macs(units=cand), a.macs(units=cand), cand))
    fits = [f for f in found if in_window(f[0], target, False, cfg.tol)]
    under = [f for f in found if f[0] <= target * (1 + 1e-9)] or found
    return max(fits, key=lambda f: f[1])[2] if fits else max(under, key=lambda f: f[0])[2]


def _fixed(view, units: dict):
    """``view`` with ``units`` as its base widths (groups a solve leaves free take them)."""
    cost = view.cost
    return dataclasses.replace(view,
                               cost=CostModel(cost.macs_terms, cost.params_terms, {**cost.units, **units}))
