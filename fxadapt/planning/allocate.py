"""Importance allocation: keep the units with the most importance per unit of cost until the budget holds.

Every unit ``j`` of group ``g`` has an importance ``s_j >= 0`` (an estimated loss increase when it is
removed) and every removable block ``b`` one, ``s_b``, in the same currency. Costs are the cost model's
marginals at the current allocation ``(n, d)``: ``c_g = dM/dn_g`` per unit, and ``c_b = dM/dd_b`` (the MACs
a block saves, exact: ``M`` is multilinear in the presences). For a multiplier ``lambda >= 0``

    n_g(lambda) = max(lo_g, #{j in alive_g : s_j >= lambda c_g}),   d_b(lambda) = [s_b >= lambda c_b]

keeps exactly the units and blocks worth their cost at price ``lambda``. ``M`` is whatever ``a.cost.macs``
counts: MACs, or parameters on ``Analysis.params_as_macs()`` (a params budget prices every unit by the
parameters it carries). ``M(n(lambda), d(lambda))`` does
not increase with ``lambda``, so bisection (in ``log lambda``) finds the smallest price that meets the
target ``T``: the Lagrangian relaxation of ``max sum s  s.t.  M <= T``, the common "wider" pull of every
group cancelled by the one price. The marginals depend on the allocation (a conv's cost is ``n_in n_out``),
so the costs are re-read at the solution and the bisection repeated (``rounds``): a fixed point of the
coupled costs. Units are only ever removed (``alive``), so an iterative prune can call this repeatedly.

>>> import numpy as np, torch, fxadapt
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 2, 1))
>>> a = fxadapt.analyze(m, (torch.randn(1, 3, 4, 4),))
>>> s = {0: np.arange(8.0), 1: np.ones(8) * 100}        # group 1 matters far more per unit
>>> units, present = allocate(a, 0.5 * a.macs(), s, {}, bounds={0: (1, 8), 1: (1, 8)})
>>> units[1] > units[0], a.cost.macs(units, present) <= 0.5 * a.macs()
(True, True)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis


def marginal_costs(a: Analysis, units: dict[int, int],
                   present: dict[int, float]) -> tuple[dict[int, float], dict[int, float]]:
    """``(dM/dn_g, dM/dd_b)`` at ``(units, present)`` from the compiled cost polynomial (one backward)."""
    n = {g: torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for g, v in units.items()}
    d = {b: torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for b, v in present.items()}
    total = a.cost.macs(n, d) if (n or d) else None
    if total is None or not total.requires_grad:
        return {g: 0.0 for g in n}, {b: 0.0 for b in d}
    total.backward()
    grad = lambda t: float(t.grad) if t.grad is not None else 0.0   # noqa: E731
    return {g: grad(t) for g, t in n.items()}, {b: grad(t) for b, t in d.items()}


def _at_price(lam: float, ranked: dict, cost_g: dict, lo: dict, blocks: dict, cost_b: dict, hi: dict):
    units = {g: min(hi[g], max(lo[g], int(np.count_nonzero(s >= lam * max(cost_g[g], 1e-12)))))
             for g, s in ranked.items()}
    present = {b: float(s >= lam * max(cost_b[b], 1e-12)) for b, s in blocks.items()}
    return units, present


def allocate(a: Analysis, target: float, scores: dict[int, np.ndarray], block_scores: dict[int, float],
             bounds: dict[int, tuple[int, int]], alive: dict[int, np.ndarray] | None = None,
             rounds: int = 3) -> tuple[dict[int, int], dict[int, float]]:
    """``(units, present)``: kept units per group in ``bounds`` (``lo`` always kept, at most ``hi`` and
    the ``alive`` ones) and block presences (1: kept) under ``target`` MACs, by importance per unit of cost
    (module docstring). ``scores[g]`` holds one score per unit of group ``g``; blocks absent from
    ``block_scores`` stay. When even ``lambda = inf`` misses ``target`` the narrowest allocation is
    returned."""
    alive = alive or {g: np.ones(len(s), dtype=bool) for g, s in scores.items()}
    ranked = {g: np.asarray(scores[g], dtype=float)[alive[g]] for g in bounds}
    hi = {g: min(bounds[g][1], int(alive[g].sum())) for g in bounds}
    lo = {g: min(bounds[g][0], hi[g]) for g in bounds}
    units = dict(hi)
    present = {b: 1.0 for b in block_scores}
    for _ in range(rounds):
        cost_g, cost_b = marginal_costs(a, units, present)
        ratios = [s / max(cost_g[g], 1e-12) for g, s in ranked.items()]
        ratios += [np.array([s / max(cost_b[b], 1e-12)]) for b, s in block_scores.items()]
        flat = np.concatenate(ratios) if ratios else np.zeros(0)
        pos = flat[flat > 0]
        if pos.size == 0:
            return _at_price(np.inf, ranked, cost_g, lo, block_scores, cost_b, hi)
        lo_l, hi_l = np.log(pos.min()) - 1.0, np.log(pos.max()) + 1.0
        for _ in range(60):   # smallest price whose allocation fits
            mid = 0.5 * (lo_l + hi_l)
            u, d = _at_price(float(np.exp(mid)), ranked, cost_g, lo, block_scores, cost_b, hi)
            if a.cost.macs(u, d) <= target:
                hi_l = mid
            else:
                lo_l = mid
        units, present = _at_price(float(np.exp(hi_l)), ranked, cost_g, lo, block_scores, cost_b, hi)
    return units, present


def uniform_scale(a: Analysis, target: float, gids: Collection[int]) -> float:
    """The one factor ``s`` with ``M(s N_g for g in gids) = target`` (bisection on real widths): the data-free
    solver's scale before rounding, which the importance allocation's floor is a fraction of."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if a.cost.macs({g: mid * a.groups[g].units for g in gids}) <= target else (lo, mid)
    return lo


def top_units(score: np.ndarray, alive: np.ndarray, n: int) -> np.ndarray:
    """The keep-mask of the ``n`` highest-scored ``alive`` units.

    >>> top_units(np.array([3.0, 1.0, 2.0, 5.0]), np.array([True, True, True, False]), 2).tolist()
    [True, False, True, False]
    """
    s = np.where(alive, np.asarray(score, dtype=float), -np.inf)
    keep = np.zeros(len(s), dtype=bool)
    keep[np.argsort(-s, kind="stable")[:n]] = True
    return keep & alive
