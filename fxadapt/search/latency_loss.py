"""The expected latency of a gated supernet: the differentiable latency term of a DNA search.

Per gated group ``g``: candidate widths ``c_j = n_min + sum(bins[:j])`` (units) with probabilities
``pi_j = P_j - P_{j+1}`` (``P`` the gate's keep marginals, ``P_0 = 1``, ``P_{K+1} = 0``; for sampled gates
the noise-free choice probabilities). A grid of at most ``G`` widths ``u_0 < ... < u_{G-1}`` per group
(aligned to the target's block where the group allows, from the narrowest to the widest candidate) and
linear interpolation weights ``W`` (a candidate between ``u_i`` and ``u_{i+1}`` puts ``(u_{i+1} - c) /
(u_{i+1}
- u_i)`` on ``u_i``, the rest on ``u_{i+1}``) give the group's mass on its grid, ``q_g = W^T pi_g``.

Every layer with a latency key (``fxadapt.planning.latency.templates``) whose key depends on groups ``D`` (the
first two by share of the key; any others at their current expected units, rounded) gets a table
``T[i, k]`` = lookup-table seconds at grid widths ``(u_{g1, i}, u_{g2, k})``, and

    E[t] = q_{g1}^T T q_{g2}        (exact for the multilinear interpolant of the table: the gates are
    independent)

times the presence of the blocks the layer sits in (depth gates). The remainder scales with the expected
activation volume (linear in the units, so its expectation is its value at ``E[n]``), and the sum is
calibrated exactly as ``fxadapt.planning.latency.LatencyModel`` (original measured end to end):

    E[L] = c * (sum_l E[t_l] + r0 * V(E[n]) / V(n0)) + d.

>>> import torch, fxadapt
>>> from fxadapt.planning.latency import LatencyModel
>>> from fxadapt.hw.sim import SimulatedTarget, fake_lut
>>> from fxadapt.search.supernet import SupernetConfig, build_supernet
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 3))
>>> a = fxadapt.analyze(m, (torch.randn(1, 3, 12, 12),))
>>> sn = build_supernet(a, None, SupernetConfig(expand=1.0, depth_slots=0, gates="markov"))
>>> lm = LatencyModel(sn.analysis, fake_lut(), 1e-3)
>>> el = ExpectedLatency(sn, lm)
>>> abs(float(el()) - lm.predict({})) < 1e-6 * lm.predict({})     # all gates on: the model's prediction
True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fxadapt import dist, meta
from fxadapt.hw.lut import LUT
from fxadapt.hw.target import Target
from fxadapt.ops.forms import LinearForm
from fxadapt.planning.latency import LatencyModel, Measurer, parse_latency
from fxadapt.search.dna import run_search
from fxadapt.search.loop import prepare
from fxadapt.search.losses import budget_loss

if TYPE_CHECKING:

    from fxadapt.analysis.analyze import Analysis

GRID = 6


def width_probs(gate) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate widths (units) of a width gate and their probabilities (differentiable in the gate)."""
    widths = gate.n_min + torch.cat([gate.bin_size.new_zeros(1), torch.cumsum(gate.bin_size, 0)])
    marg = gate.marginals()
    ones, zeros = marg.new_ones(1), marg.new_zeros(1)
    p = torch.cat([ones, marg, zeros])
    return widths, (p[:-1] - p[1:]).clamp_min(0)


def _grid(widths: np.ndarray, align_units: int, size: int) -> np.ndarray:
    lo, hi = float(widths[0]), float(widths[-1])
    pts = np.unique(np.round(np.linspace(lo, hi, size)))
    if align_units > 1:
        snapped = np.unique(np.clip(np.round(pts / align_units) * align_units, lo, hi))
        pts = np.unique(np.concatenate([[lo], snapped, [hi]]))
    return pts


def _interp(widths: np.ndarray, grid: np.ndarray) -> torch.Tensor:
    """``W[j, i]``: linear interpolation weight of candidate ``j`` on grid point ``i``."""
    W = np.zeros((len(widths), len(grid)))
    for j, c in enumerate(widths):
        i = int(np.clip(np.searchsorted(grid, c, side="right") - 1, 0, len(grid) - 1))
        if i == len(grid) - 1 or c <= grid[i]:
            W[j, i] = 1.0
            continue
        t = (c - grid[i]) / (grid[i + 1] - grid[i])
        W[j, i], W[j, i + 1] = 1 - t, t
    return torch.tensor(W, dtype=torch.float32)


def _deps(template) -> list[int]:
    """The groups a key template depends on, most-weighted first."""
    weight: dict[int, float] = {}

    def walk(v):
        if isinstance(v, LinearForm):
            for g, c in v.coefs:
                weight[g] = weight.get(g, 0.0) + abs(c)
        elif isinstance(v, tuple):
            for i in v:
                walk(i)

    walk(template)
    return sorted(weight, key=lambda g: -weight[g])


class ExpectedLatency:
    """``E[L]`` of the module docstring for supernet ``sn`` and latency model ``lm`` (built on
    ``sn.analysis``); calling it gives a differentiable scalar (seconds)."""

    def __init__(self, sn, lm, grid: int = GRID, align: int = 1):
        self.sn, self.lm = sn, lm
        self.gates = sn.width_gates()
        self.grids, self.W = {}, {}
        for gid, gate in self.gates.items():
            widths = width_probs(gate)[0].detach().cpu().numpy()
            step = max(1, align // max(sn.analysis.groups[gid].granularity, 1))
            self.grids[gid] = _grid(widths, step, grid)
            self.W[gid] = _interp(widths, self.grids[gid])
        self.tables = [self._table(e) for e in lm.entries]

    def _table(self, e) -> tuple[list[int], torch.Tensor]:
        deps = [g for g in _deps(e.template) if g in self.gates][:2]
        full = dict(self.lm.full({}))
        axes = [self.grids[g] for g in deps]
        keys, shape = [], tuple(len(a) for a in axes)
        for idx in np.ndindex(*shape) if shape else [()]:
            point = dict(full)
            point.update({g: float(axes[k][i]) for k, (g, i) in enumerate(zip(deps, idx))})
            keys.append(self.lm.key_of(e, point))
        t = torch.tensor(self.lm.lut.get(keys), dtype=torch.float32).reshape(shape)
        return deps, t

    def __call__(self) -> torch.Tensor:
        q, n = {}, dict(self.lm.a.cost.units)
        for gid, gate in self.gates.items():
            widths, p = width_probs(gate)
            q[gid] = p @ self.W[gid].to(p.device)
            n[gid] = (widths * p).sum()
        present = {b: g() for b, g in self.sn.depth_gates().items()}
        total = 0.0
        for e, (deps, t) in zip(self.lm.entries, self.tables):
            v = t.to(q[deps[0]].device) if deps else t
            for g in deps:
                v = torch.tensordot(q[g], v, dims=([0], [0]))
            total = total + v * math.prod(present.get(b, 1.0) for b in e.blocks)
        volume = sum(e.vol_coef * (e.vol_form.value(n) if hasattr(e.vol_form, "value") else float(e.vol_form))
                     for e in self.lm.entries)
        raw = total + self.lm.rem0 * volume / self.lm.vol0
        return self.lm.scale * raw + self.lm.offset


@dataclass
class LatencySearch:
    """What ``search_latency`` leaves: the trained supernet, its state, the searched widths, and the lookup
    table and measurer the repair reuses."""

    sn: object
    state: object
    units: dict
    lut: object
    measure: object


def search_latency(a0: Analysis, goal, data: Any, val_data: Any, cfg, ctx=None) -> LatencySearch:
    """DNA for a latency budget (``goal.latency``, with ``goal.macs`` when given too): the search minimises
    ``L_task + lambda * L_budget(E[L], T)`` (plus the MAC budget loss when there is one) with ``E[L]`` of
    the module docstring. The searched widths are then the reference of the measured latency solve
    (``fxadapt.planning.latency.solve_latency(..., widths=searched)``: the global scale of the searched
    allocation, re-timed interleaved with the original and repaired into ``[0.9 T, T]``;
    ``fxadapt.pipeline.strategies`` runs it). Every block is kept (the latency term counts widths; depth
    follows MAC budgets)."""
    ctx = ctx if ctx is not None else dist.setup()
    hw = goal.target or Target()
    cfg = dataclasses.replace(cfg, elastic_when_shrinking=False)   # the model itself: latency shrinks
    sn, train, val = prepare(a0, a0.macs(), data, val_data, cfg, ctx)
    meas = Measurer(sn.analysis, hw)
    lut = LUT(hw, progress=cfg.progress)
    scale = (hw.batch / a0.gm.meta[meta.INPUTS].batch) if hw.batch else 1.0
    lm = LatencyModel(sn.analysis, lut, meas.base, scale)
    T = parse_latency(goal.latency, meas.base)
    el = ExpectedLatency(sn, lm, align=hw.align())
    if sn.sampled and cfg.gate_init == "budget":
        sn.center(math.sqrt(T / meas.base))
    state = run_search(sn, train, val, goal.macs, False, cfg, ctx, None,
                       lambda: cfg.budget_weight * budget_loss(el(), T, False, cfg.band))
    sn.gm.to("cpu")
    return LatencySearch(sn, state, sn.hard()[0], lut, meas)
