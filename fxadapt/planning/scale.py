"""Scale and repair on aligned ladders: the one search both width solvers run (MACs in
``fxadapt.planning.solver``, latency in ``fxadapt.planning.latency``).

A problem is a set of ladders (``fxadapt.planning.align.Ladders``: per group ``g`` the sorted rungs ``R_g``)
and a cost ``c(idx)`` of the rung indices that does not decrease when any group moves up a rung (MACs, a
predicted latency). ``T`` is the target.

1. **Scale** (``bisect``). ``idx(s)`` puts every group on the rung nearest ``s * ref_g``; ``c(idx(s))`` does
   not decrease in ``s``, so bisection on ``s in [0, top]`` finds the largest ``s`` whose rungs satisfy a
   monotone predicate ``ok`` (``c <= T``; with ``above=True`` the smallest ``s`` with ``c >= T``). It stops
   as soon as both ends give the same rungs.
2. **Repair** (``approach``). While ``done(c)`` is false, take the one-rung move toward ``T`` (up from below,
   down from above) that does not cross ``T``: the smallest step (``pick="smallest"``, the finest approach)
   or the one landing closest to ``T`` (``"closest"``); when none fits, the best swap (one group a rung
   toward ``T``, another a rung back) landing closest to ``T`` without crossing. Candidates a cost refuses
   (a constraint it checks) are ``nan``. Every round's candidates are evaluated in one call
   (``Cost.singles``, ``Cost.pairs``): vectorised for the MAC polynomial, one by one for others.

>>> import numpy as np
>>> from fxadapt.planning.align import Ladders, ladder
>>> lad = Ladders([0, 1], [ladder(32, 1, 4, 32, 4), ladder(16, 1, 2, 16, 2)], np.array([32.0, 16.0]))
>>> cost = LoopCost(lambda idx: float(lad.values(idx) @ [3.0, 5.0]))   # c = 3 n_0 + 5 n_1
>>> start = bisect(lad, lambda i: cost.total(i) <= 100)
>>> end = approach(lad, cost, start, Aim(100.0, done=lambda c: c >= 99))
>>> cost.total(start) <= cost.total(end) <= 100, lad.units(end)
(True, {0: 20, 1: 8})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fxadapt.planning.align import Ladders

_PAIRS = 4096   # a loop cost tries swaps only when there are at most this many pairs


class LoopCost:
    """A cost evaluated one assignment at a time: ``total(idx)``; ``singles``/``pairs`` loop over it. A
    ``feasible(idx)`` predicate turns refused candidates into ``nan`` (never taken)."""

    def __init__(self, total: Callable[[np.ndarray], float],
                 feasible: Callable[[np.ndarray], bool] | None = None):
        self._total, self.feasible = total, feasible

    def total(self, idx: np.ndarray) -> float:
        return float(self._total(idx))

    def _at(self, idx: np.ndarray) -> float:
        return self.total(idx) if self.feasible is None or self.feasible(idx) else np.nan

    def singles(self, idx: np.ndarray, ks: np.ndarray, d: int) -> np.ndarray:
        """Cost with group ``ks[i]`` moved ``d`` rungs, for every ``i``."""
        out = np.empty(len(ks))
        for i, k in enumerate(ks):
            cand = idx.copy()
            cand[k] += d
            out[i] = self._at(cand)
        return out

    def pairs(self, idx: np.ndarray, fwd: np.ndarray, back: np.ndarray, d: int) -> np.ndarray | None:
        """Cost with ``fwd[i]`` moved ``d`` and ``back[j]`` moved ``-d`` (``None``: too many to try)."""
        if len(fwd) * len(back) > _PAIRS:
            return None
        out = np.full((len(fwd), len(back)), np.nan)
        for i, a in enumerate(fwd):
            for j, b in enumerate(back):
                if a != b:
                    cand = idx.copy()
                    cand[a] += d
                    cand[b] -= d
                    out[i, j] = self._at(cand)
        return out


def bisect(lad: Ladders, ok: Callable[[np.ndarray], bool], above: bool = False,
           iters: int = 50) -> np.ndarray:
    """Rungs at the largest scale with ``ok`` (``above``: the smallest); ``ok`` must be monotone in ``s``."""
    lo, hi = 0.0, lad.top
    if not above and ok(lad.at_scale(hi)):
        return lad.at_scale(hi)
    for _ in range(iters):
        if np.array_equal(lad.at_scale(lo), lad.at_scale(hi)):
            break
        mid = (lo + hi) / 2
        good = ok(lad.at_scale(mid))
        if above:
            lo, hi = (lo, mid) if good else (mid, hi)
        else:
            lo, hi = (mid, hi) if good else (lo, mid)
    return lad.at_scale(hi if above else lo)


def _best(c_new: np.ndarray, c: float, target: float, above: bool, smallest: bool):
    """Flat index of the candidate that moves toward ``T`` without crossing it (the smallest step when
    ``smallest``, else the one closest to ``T``), or None; ``nan`` candidates are never taken."""
    with np.errstate(invalid="ignore"):
        ok = (c_new >= target) & (c_new < c) if above else (c_new <= target) & (c_new > c)
    if not ok.any():
        return None
    return int(np.argmin(np.where(ok, np.abs(c_new - (c if smallest else target)), np.inf)))


@dataclass(frozen=True)
class Aim:
    """Where ``approach`` heads: the target ``T``, from which side (``above``: down from above ``T``; else up
    from below), when to stop (``done(cost)``; ``None``: as close as the moves get) and which one-rung move
    to take (``pick``: the ``"smallest"`` step or the one landing ``"closest"`` to ``T``)."""

    target: float
    above: bool = False
    done: Callable[[float], bool] | None = None
    pick: str = "smallest"


def approach(lad: Ladders, cost, idx: np.ndarray, aim: Aim) -> np.ndarray:
    """Greedy rung moves toward ``aim.target`` from one side until ``aim.done(cost)`` (module docstring,
    step 2)."""
    target, above, done = aim.target, aim.above, aim.done
    d = -1 if above else 1
    idx = idx.copy()
    for _ in range(1_000_000):
        c = cost.total(idx)
        if done is not None and done(c):
            break
        fwd = np.flatnonzero((idx + d >= 0) & (idx + d < lad.size))
        k = _best(cost.singles(idx, fwd, d), c, target, above, aim.pick == "smallest") if fwd.size else None
        if k is not None:
            idx[fwd[k]] += d
            continue
        back = np.flatnonzero((idx - d >= 0) & (idx - d < lad.size))
        if not fwd.size or not back.size:
            break
        mm = cost.pairs(idx, fwd, back, d)
        if mm is None:
            break
        mm = mm.astype(float)
        mm[fwd[:, None] == back[None, :]] = np.nan  # a group cannot swap with itself
        k = _best(mm.ravel(), c, target, above, False)
        if k is None:
            break
        i, j = divmod(k, back.size)
        idx[fwd[i]] += d
        idx[back[j]] -= d
    return idx
