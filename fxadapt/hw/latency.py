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
the alignment is the target's, ``Target.align()``, unless ``SolveConfig.align`` names another): ``n(s)``
puts every group on the rung nearest ``s * N_g``; bisection finds the largest ``s`` whose predicted latency
is at most the budget ``T`` and whose MACs/params respect their budgets too (all must hold); then, while
the prediction is below ``(1 - tol / 2) T``, the one-rung move up landing closest to ``T`` without crossing
it is taken (as the MAC solver's repair). **Repair**:
the widths are materialised and measured end to end on the target (interleaved with the original, so load
drift cancels); while the measurement lies outside ``[(1 - tol) T, T]`` (``tol = 0.05``) the model is
recalibrated on it (``LatencyModel.calibrate``) and the bisection redone, at most ``max_repairs`` times; the best measured assignment at
or below ``T`` is kept. When a MAC/params budget binds before the latency does, the MAC solver's exact
widths are used and the latency only has to stay at or below ``T``.

A budget below the fastest reachable model (every group at its narrowest aligned width) is a
``BudgetError`` stating the reachable range; budgets above the original's latency are refused (growth is
solved by MAC budgets).

>>> import torch, fxadapt
>>> from fxadapt.planning.budget import Budget
>>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 128, 3), torch.nn.Conv2d(128, 8, 3)),
...                     (torch.randn(1, 3, 16, 16),))
>>> lut = fake_lut()                                  # deterministic layer times (no measurement)
>>> fake = FakeMeasure(a, lut)                        # deterministic end-to-end "measurement"
>>> cfg = fxadapt.planning.solver.SolveConfig(align=8)
>>> sol = solve_latency(a, Budget(latency=0.65), lut=lut, measure=fake, cfg=cfg)
>>> 0.95 <= sol.latency / sol.budget <= 1.0, sol.units[0] % 8, len(sol.history) <= 5
(True, 0, True)
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fxadapt import meta
from fxadapt.errors import BudgetError
from fxadapt.hw.keys import resolve
from fxadapt.hw.lut import LUT
from fxadapt.hw.target import Target, interleaved, median_time
from fxadapt.planning.solver import SolveConfig, _bounds, _problem, solve_widths

TOL = 0.05


@dataclass(frozen=True)
class Entry:
    node: str
    template: tuple
    vol_coef: float      # activation volume = vol_coef * vol_form(n)
    vol_form: object
    blocks: tuple


def templates(a) -> list[Entry]:
    """The latency-key template of every node of ``a.gm`` whose registry entry has one."""
    from fxadapt.analysis.cost_build import CostCtx, FormMaker
    from fxadapt.analysis.groups import form_groups
    from fxadapt.analysis.propagate import normalize, propagate
    from fxadapt.ops.registry import spec_of

    ctx = propagate(a.gm)
    groups, group_of, _ = form_groups(ctx.ledger)
    if [g.width for g in groups] != [g.width for g in a.groups]:
        raise RuntimeError("latency keys: re-propagating the graph formed other channel groups than its analysis")
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

    def __init__(self, a, lut: LUT, base_latency: float, batch_scale: float = 1.0):
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
        keys = [resolve(e.template, full) for e in self.entries]
        if self.batch_scale != 1.0:
            keys = [(k[0], int(round(k[1] * self.batch_scale))) + k[2:] for k in keys]
        return keys

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

    def __init__(self, a, target: Target, runs: int = 15, budget_s: float = 4.0):
        self.a, self.target, self.runs, self.budget_s = a, target, runs, budget_s
        self.inputs = a.gm.meta[meta.INPUTS]
        self.orig = target.compile(a.gm, self.inputs)
        self.base = median_time(self.orig, runs, 3, budget_s, target.clock)
        self.calls = 0

    def model(self, units: dict):
        from fxadapt.passes.materialize import apply_plan
        from fxadapt.planning.plan import make_plan

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


def parse_latency(value, base: float) -> float:
    """Seconds from a fraction of ``base`` (a number) or a duration string (``"3.2ms"``, ``"800us"``, ``"0.1s"``).

    >>> parse_latency(0.5, 0.01), parse_latency("3.2ms", 1.0), parse_latency("250us", 1.0)
    (0.005, 0.0032, 0.00025)
    """
    from fxadapt.planning.budget import latency_seconds

    return latency_seconds(value, base)


def _bisect(p, ok: Callable[[np.ndarray], bool]) -> np.ndarray:
    """Rung indices at the largest global scale ``s`` with ``ok`` (``ok`` must hold at ``s = 0``)."""
    lad = p.lad
    lo, hi = 0.0, lad.top
    if ok(lad.at_scale(hi)):
        return lad.at_scale(hi)
    for _ in range(40):
        if np.array_equal(lad.at_scale(lo), lad.at_scale(hi)):
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(lad.at_scale(mid)) else (lo, mid)
    return lad.at_scale(lo)


def _fill_up(p, idx: np.ndarray, lm: LatencyModel, T: float, ok: Callable, aim: float) -> np.ndarray:
    """Greedy one-rung moves up after the bisection: while the prediction is below ``aim * T``, take the
    move (one group one rung wider) whose prediction lands closest to ``T`` without crossing it."""
    idx = idx.copy()
    for _ in range(4 * int(p.size.sum())):
        if lm.predict(p.lad.units(idx)) >= aim * T:
            break
        best, best_t = None, -1.0
        for k in np.flatnonzero(idx + 1 < p.size):
            cand = idx.copy()
            cand[k] += 1
            t = lm.predict(p.lad.units(cand))
            if best_t < t <= T and ok(cand):
                best, best_t = cand, t
        if best is None:
            break
        idx = best
    return idx


def _limits(a, budget) -> tuple[float, float]:
    from fxadapt.planning.budget import parse_budget

    if budget.macs is None and budget.params is None:
        return math.inf, math.inf
    b = parse_budget(dataclasses.replace(budget, latency=None), a.macs(), a.params())
    return (b.macs or math.inf), (b.params or math.inf)


def solve_latency(a, budget, target: Target | None = None, cfg: SolveConfig = SolveConfig(), *,
                  lut: LUT | None = None, measure: Callable | None = None, max_repairs: int = 4,
                  tol: float = TOL, progress: bool = True) -> LatencySolution:
    """Kept units per prunable group meeting ``budget`` (a ``Budget`` with ``latency=``, optionally with
    ``macs=``/``params=``) on ``target`` (default: ``budget.target``, else ``Target()``); see the module
    docstring. ``measure(units) -> seconds`` replaces the end-to-end measurement (``measure({})`` is the
    original), ``lut`` the lookup table (tests inject deterministic ones)."""
    target = target or getattr(budget, "target", None) or Target()
    align = target.align() if cfg.align == "auto" else cfg.alignment()
    cfg = dataclasses.replace(cfg, align=align)
    lut = lut or LUT(target, progress=progress)
    measure = measure or Measurer(a, target)
    base = float(measure({}))
    T = parse_latency(budget.latency, base)
    batch_scale = (target.batch / a.gm.meta[meta.INPUTS].batch) if target.batch else 1.0
    lm = LatencyModel(a, lut, base, batch_scale)
    p = _problem(a, 0.0, _bounds(a, False, cfg), {g.id: g.units for g in a.prunable}, cfg)
    macs_t, params_t = _limits(a, budget)
    n_min = p.lad.units(p.lad.at_scale(0.0))
    fastest = lm.predict(n_min)
    if T < fastest or T > base * (1 + 1e-9):
        raise BudgetError(
            f"latency budget of {T * 1e3:.3f} ms ({T / base:.3f}x) is outside the reachable range "
            f"[{fastest * 1e3:.3f}, {base * 1e3:.3f}] ms = [{fastest / base:.3f}x, 1.000x] of the original on "
            f"{target.name()} (predicted; min width {cfg.min_ratio:.0%} of each group, widths aligned to {align}"
            f"{'; latency budgets do not grow models: use a MAC budget' if T > base else ''})")
    macs_ok = lambda n: a.cost.macs(n) <= macs_t * (1 + 1e-9) and a.cost.params(n) <= params_t * (1 + 1e-9)
    sol = LatencySolution({}, base, T, base, lut_measured=0)
    best, tried = None, set()
    for _ in range(max_repairs + 1):
        fits = lambda i: lm.predict(p.lad.units(i)) <= T and macs_ok(p.lad.units(i))
        idx = _fill_up(p, _bisect(p, fits), lm, T, lambda i: macs_ok(p.lad.units(i)), 1 - tol / 2)
        n, binding = p.lad.units(idx), "latency"
        up = np.minimum(idx + 1, p.size - 1)
        if math.isfinite(macs_t) and lm.predict(p.lad.units(up)) <= T and not macs_ok(p.lad.units(up)):
            n, binding = solve_widths(a, macs_t, cfg), "macs"
        key = tuple(sorted(n.items()))
        if key in tried:
            break
        tried.add(key)
        pred, m = lm.predict(n), float(measure(n))
        sol.history.append({"units": n, "predicted": pred, "measured": m, "binding": binding})
        if m <= T and (best is None or m > best[1]):
            best = (n, m, binding)
        if m <= T and (binding == "macs" or m >= (1 - tol) * T):
            break
        lm.calibrate(n, m)
    sol.lut_measured, sol.lut_s = lut.measured, lut.measure_s
    if best is None:
        h = min(sol.history, key=lambda h: h["measured"])
        warnings.warn(_miss(h["measured"], T, base, "above"), _budget_warning(), stacklevel=2)
        best = (h["units"], h["measured"], h["binding"])
    elif best[2] == "latency" and best[1] < (1 - tol) * T:
        warnings.warn(_miss(best[1], T, base, "below"), _budget_warning(), stacklevel=2)
    sol.units, sol.latency, sol.binding = best
    return sol


def _budget_warning():
    from fxadapt.planning.budget import BudgetWarning

    return BudgetWarning


def _miss(m: float, T: float, base: float, side: str) -> str:
    return (f"measured latency {m * 1e3:.3f} ms ({m / base:.3f}x) for a budget of {T * 1e3:.3f} ms "
            f"({T / base:.3f}x): {abs(m - T) / T:.1%} {side}, outside the {TOL:.0%} window after the repairs "
            f"(aligned widths too coarse, or timing noise)")


# ---- deterministic stand-ins for tests and examples -------------------------------------------------


def step_timer(key: tuple, block: int = 8) -> float:
    """A deterministic layer time: MACs / 1e9 s, doubled when the channels are not multiples of ``block``
    (the step onnxruntime's NCHWc kernels show), plus 2 us.

    >>> k = ("conv", 1, 16, 16, 1, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), False, (0, 0), True, "float32")
    >>> step_timer(k) < step_timer(k[:2] + (15,) + k[3:])
    True
    """
    if key[0] == "linear":
        _, rows, fin, fout = key[:4]
        macs, chans = rows * fin * fout, (fin, fout)
    else:
        n, cin, cout, groups, spatial, kernel = key[1:7]
        stride = key[7]
        out = math.prod(max(1, s // st) for s, st in zip(spatial, stride))
        macs, chans = n * cout * (cin // groups) * math.prod(kernel) * out, (cin, cout)
    slow = 2.0 if any(c % block for c in chans) else 1.0
    return macs * slow / 1e9 + 2e-6


def fake_lut(timer: Callable = step_timer) -> LUT:
    """A lookup table over ``timer`` cached in a fresh temporary folder (no measurement)."""
    import tempfile
    from pathlib import Path

    return LUT(Target(), timer=timer, path=Path(tempfile.mkdtemp()) / "lut.json", progress=False)


class FakeMeasure:
    """Deterministic end-to-end latency: the ``lut`` sum at ``units`` times ``gain`` plus ``overhead`` seconds;
    counts its calls."""

    def __init__(self, a, lut: LUT, gain: float = 1.1, overhead: float = 1e-5):
        self.a, self.lm, self.gain, self.overhead, self.calls = a, LatencyModel(a, lut, 0.0), gain, overhead, 0

    def __call__(self, units: dict) -> float:
        self.calls += 1
        return self.gain * self.lm.lut_sum(units) + self.overhead


def adapt_latency(model, budget, example_inputs, cfg: SolveConfig = SolveConfig(), **kw):
    """Capture, analyse, ``solve_latency`` and materialise: the adapted ``GraphModule`` (BatchNorm kept)
    and the ``LatencySolution``. ``kw`` go to ``solve_latency`` (``target``, ``lut``, ``measure``, ...).
    ``fxadapt.transform`` does the same once its data-free strategy is wired to ``solve_latency``."""
    from fxadapt.analysis import analyze
    from fxadapt.passes.materialize import apply_plan
    from fxadapt.planning.plan import make_plan

    a = analyze(model, example_inputs)
    sol = solve_latency(a, budget, cfg=cfg, **kw)
    return apply_plan(a.gm, make_plan(a, sol.units)).graph_module, sol
