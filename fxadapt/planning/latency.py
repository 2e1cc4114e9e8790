"""Latency budgets: predict a width assignment's latency on a target, solve widths to a latency, repair.

**Prediction.** Every node whose registry entry has a ``latency_key`` contributes its lookup-table entry
(``fxadapt.hw.lut``) at the widths ``n``; what the table does not hold (pointwise ops, pooling, layout
changes, per-run overhead) is the *remainder*, measured once as ``r0 = max(L0 - LUT(n0), 0)`` on the
original (``L0`` measured end to end, ``n0`` the original widths) and scaled with the activation volume
``V(n)`` (the summed output sizes of the keyed layers):

    L(n) = c * (LUT(n) + r0 * V(n) / V(n0)),     c = L0 / (LUT(n0) + r0)

so the prediction is exact on the original; an end-to-end measurement ``m`` at ``n`` recalibrates it
to the affine map ``L = c' * raw(n) + d'`` through the original and that measurement (a secant; where the
two are too close, one global rescale ``c <- c * m / L(n)``).

**Solving** (``solve_latency``). Widths follow the MAC solver's aligned ladders (``fxadapt.planning.solver``;
the alignment is the target's, ``Target.align()``, unless ``SolveConfig.align`` names another) and the same
scale-and-repair search (``fxadapt.planning.scale``): bisection on the global scale for the largest assignment
predicted at most ``T'`` (MAC/params budgets held too: all must hold), then one-rung moves landing closest to
``T'``. **Repair** (``fxadapt.planning.latency_repair``): the widths are materialised and measured end to end
on the target (interleaved with the original, so load drift cancels). The window is ``[(1 - tol) T, T]``
(``tol = 0.10``) and the aim its middle ``A = (1 - tol / 2) T``, so a re-time's noise stays under ``T``. The
first solve uses ``T' = A``; its measurement calibrates the model once (``LatencyModel.calibrate``); from then
on the model is fixed and the *predicted target* ``T'`` is searched on measurements: ``T' <- T' A / m`` until
attempts lie on both sides of the window, then the secant between the nearest two (widths already measured
push ``T'`` on until they change). At most ``max_repairs`` re-solves; a measurement below the window is a miss
like one above it. The best measured assignment at or below ``T`` is kept (a ``BudgetWarning`` when it is
below the window). When a MAC/params budget binds before the latency does, the MAC solver's exact widths are
used and the latency only has to stay at or below ``T``.

A budget below the fastest reachable model (every group at its narrowest aligned width) is a
``BudgetError`` stating the reachable range; budgets above the original's latency are refused (growth is
solved by MAC budgets).

>>> import tempfile, torch, fxadapt
>>> from pathlib import Path
>>> from fxadapt.hw.sim import SimulatedTarget
>>> from fxadapt.planning.budget import Budget
>>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 128, 3), torch.nn.Conv2d(128, 8, 3)),
...                     (torch.randn(1, 3, 16, 16),))
>>> t = SimulatedTarget(seed=0)                       # a synthetic processor: no real timing
>>> lut = LUT(t, path=Path(tempfile.mkdtemp()) / "lut.json", progress=False)
>>> sol = solve_latency(a, Budget(latency=0.5), t, fxadapt.planning.solver.SolveConfig(align=8), lut=lut)
>>> 0.9 <= sol.latency / sol.budget <= 1.0, sol.units[0] % 8, len(sol.history) <= 6
(True, 0, True)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fxadapt import meta
from fxadapt.analysis.cost_build import CostCtx, FormMaker
from fxadapt.analysis.groups import form_groups
from fxadapt.analysis.propagate import normalize, propagate
from fxadapt.errors import BudgetError, BudgetWarning, warn
from fxadapt.hw.lut import LUT
from fxadapt.hw.target import Target, interleaved, median_time
from fxadapt.ops.latency_keys import resolve
from fxadapt.ops.registry import spec_of
from fxadapt.passes.materialize import apply_plan
from fxadapt.planning.budget import Goal, latency_seconds, parse_budget
from fxadapt.planning.latency_repair import RepairState, repairs
from fxadapt.planning.plan import make_plan
from fxadapt.planning.solver import SolveConfig, ladder_problem, unit_bounds

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis

TOL = 0.10     # a latency budget T lands in [(1 - TOL) T, T], measured; the solver aims at (1 - TOL / 2) T


@dataclass(frozen=True)
class Entry:
    node: str
    template: tuple
    vol_coef: float      # activation volume = vol_coef * vol_form(n)
    vol_form: object
    blocks: tuple


def templates(a: Analysis) -> list[Entry]:
    """The latency-key template of every node of ``a.gm`` whose registry entry has one."""
    ctx = propagate(a.gm)
    groups, group_of, _ = form_groups(ctx.ledger)
    if [g.width for g in groups] != [g.width for g in a.groups]:
        raise RuntimeError("latency keys: re-propagating the graph formed other channel groups than its "
                           "analysis")
    sites = {}
    for s in ctx.ledger.sites:
        if s.kind == "param":
            sites.setdefault((s.ref.target, s.axis), s.labels)
    cx = CostCtx(ctx, sites, FormMaker(ctx.ledger.uf.roots(), group_of, a.groups))
    out = []
    for node in a.gm.graph.nodes:
        spec, call = spec_of(node), normalize(node)
        if spec is None or spec.latency_key is None or call is None:
            continue
        cx.node = node
        tpl = spec.latency_key(call, cx)
        if tpl is None:
            continue
        shape = cx.out_shape
        coef = math.prod(shape) / shape[1] if tpl[0] == "conv" else math.prod(shape[:-1])
        out.append(Entry(node.name, tpl, float(coef), tpl[3], tuple(node.meta.get(meta.BLOCK, ()))))
    return out


def _val(f, n: dict) -> float:
    return f.value(n) if hasattr(f, "value") else float(f)


class LatencyModel:
    """``L(n)`` of the module docstring: lookup table + scaled remainder, calibrated on measurements."""

    def __init__(self, a: Analysis, lut: LUT, base_latency: float, batch_scale: float = 1.0):
        self.a, self.lut, self.base = a, lut, float(base_latency)
        self.entries = templates(a)
        self.batch_scale = batch_scale
        n0 = dict(a.cost.units)
        self.lut0, self.vol0 = self.lut_sum(n0), max(self.volume(n0), 1.0)
        self.rem0 = max(self.base - self.lut0, 0.0)
        self.scale = self.base / max(self.lut0 + self.rem0, 1e-12)

    def full(self, n: dict) -> dict:
        return {**self.a.cost.units, **n}

    def keys(self, n: dict) -> list[tuple]:
        full = self.full(n)
        return [self.key_of(e, full) for e in self.entries]

    def key_of(self, e: Entry, full: dict) -> tuple:
        """The concrete key of one entry at the full units ``full`` (at the target's batch)."""
        k = resolve(e.template, full)
        return (k[0], int(round(k[1] * self.batch_scale))) + k[2:] if self.batch_scale != 1.0 else k

    def lut_sum(self, n: dict, present: dict | None = None) -> float:
        if not self.entries:
            return 0.0
        t = self.lut.get(self.keys(n))
        if present:
            t = t * np.array([math.prod(present.get(b, 1.0) for b in e.blocks) for e in self.entries])
        return float(t.sum())

    def volume(self, n: dict) -> float:
        full = self.full(n)
        return sum(e.vol_coef * _val(e.vol_form, full) for e in self.entries)

    def raw(self, n: dict, present: dict | None = None) -> float:
        """``LUT(n) + r0 * V(n) / V(n0)`` (uncalibrated seconds)."""
        return self.lut_sum(n, present) + self.rem0 * self.volume(n) / self.vol0

    def predict(self, n: dict, present: dict | None = None) -> float:
        """Predicted seconds at kept units ``n`` (groups left out keep their width)."""
        return self.scale * self.raw(n, present) + self.offset

    offset = 0.0

    def calibrate(self, n: dict, measured: float) -> None:
        """Recalibrate on an end-to-end measurement at ``n``: the affine map ``L = c * raw + d`` through the
        original ``(raw(n0), L0)`` and ``(raw(n), measured)`` (a secant; one global rescale
        ``c <- c * measured / L(n)`` when the two raws are within 1%)."""
        r, r0 = self.raw(n), self.lut0 + self.rem0
        slope = (measured - self.base) / (r - r0) if abs(r - r0) > 0.01 * r0 else 0.0
        if slope > 0:
            self.scale, self.offset = slope, self.base - slope * r0
        else:
            self.scale *= measured / max(self.predict(n), 1e-12)
            self.offset = 0.0

class Measurer:
    """End-to-end seconds of the original's widths changed to ``units`` on ``target``: materialised,
    compiled and timed interleaved with the original, then scaled by ``base / original now`` so machine
    load drift cancels. ``Measurer(a, target)({})`` is the original's latency ``base``."""

    def __init__(self, a: Analysis, target: Target, runs: int = 15, budget_s: float = 4.0):
        self.a, self.target, self.runs, self.budget_s = a, target, runs, budget_s
        self.inputs = a.gm.meta[meta.INPUTS]
        self.orig = target.compile(a.gm, self.inputs)
        self.base = median_time(self.orig, runs, 3, budget_s, target.clock)
        self.calls = 0

    def model(self, units: dict):
        return apply_plan(self.a.gm, make_plan(self.a, units)).graph_module

    def __call__(self, units: dict) -> float:
        if not units or all(units.get(g, v) == v for g, v in self.a.cost.units.items()):
            return self.base
        self.calls += 1
        fn = self.target.compile(self.model(units), self.inputs)
        med = interleaved({"orig": self.orig, "cand": fn}, self.runs, 3, 2 * self.budget_s, self.target.clock)
        return med["cand"] * self.base / med["orig"]


@dataclass
class LatencySolution:
    """What ``solve_latency`` found: kept units per group, the measured and budget latency (seconds), the
    original's latency, and per attempt ``(predicted, measured)``."""

    units: dict
    latency: float
    budget: float
    base: float
    binding: str = "latency"
    history: list = field(default_factory=list)
    lut_measured: int = 0
    lut_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.latency / self.base


def parse_latency(value: float | str, base: float) -> float:
    """Seconds from a fraction of ``base`` (a number) or a duration string (``"3.2ms"``, ``"800us"``,
    ``"0.1s"``).

    >>> parse_latency(0.5, 0.01), parse_latency("3.2ms", 1.0), parse_latency("250us", 1.0)
    (0.005, 0.0032, 0.00025)
    """
    return latency_seconds(value, base)


def _limits(a: Analysis, budget) -> tuple[float, float]:
    """The MAC and params limits of ``budget`` as counts (a ``Goal`` holds them resolved already)."""
    if budget.macs is None and budget.params is None:
        return math.inf, math.inf
    b = budget if isinstance(budget, Goal) \
            else parse_budget(dataclasses.replace(budget, latency=None), a.macs(),
                                                             a.params())
    return (b.macs or math.inf), (b.params or math.inf)


def solve_latency(a: Analysis, budget, target: Target | None = None, cfg: SolveConfig = SolveConfig(), *,
                  lut: LUT | None = None, measure: Callable | None = None, max_repairs: int = 5,
                  tol: float = TOL, progress: bool = True, widths: dict | None = None) -> LatencySolution:
    """Kept units per prunable group meeting ``budget`` (a ``Budget`` with ``latency=``, optionally with
    ``macs=``/``params=``) on ``target`` (default: ``budget.target``, else ``Target()``); see the module
    docstring. ``measure(units) -> seconds`` replaces the end-to-end measurement (``measure({})`` is the
    original), ``lut`` the lookup table; ``widths`` the units the global scale multiplies (default: the
    original's; a search passes the widths it found, so the repair keeps their allocation)."""
    target = target or getattr(budget, "target", None) or Target()
    align = target.align() if cfg.align == "auto" else cfg.alignment()
    cfg = dataclasses.replace(cfg, align=align)
    lut = lut or LUT(target, progress=progress)
    measure = measure or Measurer(a, target)
    base = float(measure({}))
    T = parse_latency(budget.latency, base)
    batch_scale = (target.batch / a.gm.meta[meta.INPUTS].batch) if target.batch else 1.0
    lm = LatencyModel(a, lut, base, batch_scale)
    ref = {g.id: max(int((widths or {}).get(g.id, g.units)), 1) for g in a.prunable}
    p = ladder_problem(a, 0.0, unit_bounds(a, False, cfg), ref, cfg)
    _check_reachable(lm.predict(p.lad.units(p.lad.at_scale(0.0))), T, base, target, cfg)
    macs_t, params_t = _limits(a, budget)
    macs_ok = lambda n: a.cost.macs(n) <= macs_t * (1 + 1e-9) and a.cost.params(n) <= params_t * (1 + 1e-9)
    sol = LatencySolution({}, base, T, base)
    best = repairs(RepairState(a=a, p=p, lm=lm, T=T, tol=tol, macs_t=macs_t, cfg=cfg, macs_ok=macs_ok,
                               history=sol.history), measure, max_repairs)
    sol.lut_measured, sol.lut_s = lut.measured, lut.measure_s
    sol.units, sol.latency, sol.binding = _verdict(sol.history, best, T, base, tol)
    return sol


def _check_reachable(fastest: float, T: float, base: float, target: Target, cfg: SolveConfig) -> None:
    if T < fastest or T > base * (1 + 1e-9):
        raise BudgetError(
            f"latency budget of {T * 1e3:.3f} ms ({T / base:.3f}x) is outside the reachable range "
            f"[{fastest * 1e3:.3f}, {base * 1e3:.3f}] ms = [{fastest / base:.3f}x, 1.000x] of the original "
            f"on {target.name()} (predicted; min width {cfg.min_ratio:.0%} of each group, widths aligned to "
            f"{cfg.alignment()}"
            f"{'; latency budgets do not grow models: use a MAC budget' if T > base else ''})")


def _verdict(history: list, best, T: float, base: float, tol: float) -> tuple[dict, float, str]:
    """The best measured assignment at or below ``T``, with a ``BudgetWarning`` when it is outside the window
    (or, when every attempt was above ``T``, the fastest one)."""
    if best is None:
        h = min(history, key=lambda h: h["measured"])
        warn(_miss(h["measured"], T, base, "above", tol), BudgetWarning)
        return h["units"], h["measured"], h["binding"]
    if best[2] == "latency" and best[1] < (1 - tol) * T:
        warn(_miss(best[1], T, base, "below", tol), BudgetWarning)
    return best


def _miss(m: float, T: float, base: float, side: str, tol: float) -> str:
    return (f"measured latency {m * 1e3:.3f} ms ({m / base:.3f}x) for a budget of {T * 1e3:.3f} ms "
            f"({T / base:.3f}x): {abs(m - T) / T:.1%} {side}, outside the {tol:.0%} window after the repairs "
            f"(aligned widths too coarse, or timing noise)")
