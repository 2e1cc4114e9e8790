"""The elastic supernet: the model grown to ``expand`` x its widths plus inactive block slots, with gates.

Construction (every step function-preserving, so the supernet at its initial gates *is* the model):

1. analyse the model; grow every growable group to ``ceil(expand * N_g)`` units and insert
   ``depth_slots`` zero-initialised copies after every repeatable block (``passes.materialize``);
2. analyse the grown graph; for each prunable group, order units (original ones first, by L1
   importance, then grown ones) and cut them into FLOPs-sensitive bins (CafeNet): a bin holds
   ``round(c / m_g)`` units where ``m_g = dMACs/dn_g`` is the MACs of one unit of the group and ``c`` the
   median group MACs over ``bins``, so one bin costs about the same MACs in every group;
3. insert width gates (on for the original units) and depth gates (on for original blocks, off for the
   slots) with ``passes.insert_gates``.

Expected MACs are the grown graph's cost polynomial evaluated at the gates' expected units and depth
values; at hard 0/1 gates they equal the cost model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from fxadapt import meta
from fxadapt.analysis import Analysis, analyze
from fxadapt.analysis.hold import apply_hold
from fxadapt.errors import SearchConfigError
from fxadapt.options import Options
from fxadapt.passes.insert_gates import (
    DepthGate,
    GateConfig,
    GateSpec,
    WidthGate,
    WidthSpec,
    insert_gates,
    strip_gates,
)
from fxadapt.passes.materialize import apply_plan
from fxadapt.passes.rewire_blocks import repeat_blocker
from fxadapt.passes.shape_check import shape_check
from fxadapt.planning.plan import growth_blocker, importance, make_plan
from fxadapt.planning.solver import limited

if TYPE_CHECKING:
    from torch.fx import GraphModule


@dataclass(frozen=True)
class SupernetConfig(Options):
    """The search space: how far groups grow, how many block slots, bins and gates; checked at
    construction."""

    error = SearchConfigError
    hints = {"gates": "'markov': DMCP bins, 'gumbel': FBNetV2, 'topk': MSG-DAS"}

    expand: float = 1.5
    depth_slots: int = 1
    bins: int = 16
    min_ratio: float = 0.1
    gates: Literal["markov", "gumbel", "topk"] = "markov"   # width gates
    top_k: int = 2          # paths per group for gates="topk"

    def __post_init__(self):
        super().__post_init__()
        self.check(self.expand >= 1.0, "expand", "at least 1.0 (the supernet contains the model)")
        self.check(self.depth_slots >= 0, "depth_slots", "at least 0")
        self.check(self.bins >= 1, "bins", "at least 1")
        self.check(0.0 <= self.min_ratio <= 1.0, "min_ratio", "in [0, 1]")
        self.check(self.top_k >= 1, "top_k", "at least 1")


class Supernet:
    """A gated, grown copy of a model (see module docstring). ``gm`` trains like any module."""

    def __init__(self, gm: GraphModule, analysis: Analysis, original: Analysis, spec: GateSpec,
                 inputs: tuple):
        self.gm, self.analysis, self.original, self.spec, self.inputs = gm, analysis, original, spec, inputs

    def width_gates(self) -> dict[int, WidthGate]:
        return {gid: self.gm.get_submodule(f"fxadapt_gates.w{gid}") for gid in self.spec.widths}

    def depth_gates(self) -> dict[int, DepthGate]:
        return {bid: self.gm.get_submodule(f"fxadapt_gates.d{bid}") for bid in self.spec.depths}

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.gm.named_parameters() if n.startswith("fxadapt_gates.")]

    def weight_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.gm.named_parameters() if not n.startswith("fxadapt_gates.")]

    def expected_macs(self) -> torch.Tensor:
        n = {gid: g.expected_units() for gid, g in self.width_gates().items()}
        d = {bid: g() for bid, g in self.depth_gates().items()}
        return self.analysis.cost.macs(n, d)

    def hard(self) -> tuple[dict[int, int], dict[int, float]]:
        units = {gid: g.hard_units() for gid, g in self.width_gates().items()}
        present = {bid: float(g().item() > 0.5) for bid, g in self.depth_gates().items()}
        return units, present

    @property
    def sampled(self) -> bool:
        """Whether the gates are sampled (Gumbel / top-k) rather than deterministic Markov bins."""
        return any(hasattr(g, "theta") for g in self.width_gates().values())

    def resample(self, gen: torch.Generator | None, tau: float = 1.0) -> None:
        """Sampled gates: draw the noise (and set the temperature) the next forwards use; ``None``: none."""
        for g in list(self.width_gates().values()) + list(self.depth_gates().values()):
            if hasattr(g, "resample"):
                g.resample(gen)
            if hasattr(g, "tau"):
                g.tau = tau

    @torch.no_grad()
    def center(self, scale: float, spread: float = 0.25) -> None:
        """Sampled gates: logits ``theta_j = -((w_j - c) / (spread * n_on))^2 / 2`` around ``c = scale *
        n_on`` (``w_j`` the width of choice ``j``, ``n_on`` the original width), so the search starts at the
        uniformly scaled widths (``scale = sqrt(target / MACs)`` meets the budget) instead of everywhere."""
        for gid, g in self.width_gates().items():
            if not hasattr(g, "theta"):
                continue
            n_on = self.spec.widths[gid].n_on
            w = g.n_min + torch.cat([g.bin_size.new_zeros(1), torch.cumsum(g.bin_size, 0)])
            g.theta.copy_(-0.5 * ((w - scale * n_on) / (spread * n_on)) ** 2)

    @torch.no_grad()
    def project(self) -> None:
        """Clamp the bounded gate parameters (Markov ``alpha``, depth ``beta``) back to [0, 1]."""
        for n, p in self.gm.named_parameters():
            if n.startswith("fxadapt_gates.") and not n.endswith("theta"):
                p.clamp_(0, 1)

    def entropy(self) -> float:
        # Markov gates: of the conditional parameters; sampled gates: of the bins' keep probabilities
        ps = [g.alpha if hasattr(g, "alpha") else g.marginals() for g in self.width_gates().values()]
        ps = [p.clamp(1e-4, 1 - 1e-4) for p in ps]
        ps += [g.beta.clamp(1e-4, 1 - 1e-4).view(1) for g in self.depth_gates().values()]
        if not ps:
            return 0.0
        p = torch.cat(ps).detach()
        return float((-(p * p.log() + (1 - p) * (1 - p).log())).mean())

    def scores(self) -> dict[int, np.ndarray]:
        """Per-unit scores reproducing each gate's order (earlier in the order = kept first)."""
        out = {}
        for gid, w in self.spec.widths.items():
            s = np.zeros(w.units)
            s[np.asarray(w.order)] = -np.arange(w.units)
            out[gid] = s
        return out

    def bounds(self) -> dict[int, tuple[int, int]]:
        """Units each gated group may take: from its always-on minimum to everything the supernet holds,
        within the user's limits on the original group (``fxadapt.analysis.hold``)."""
        orig = {g.producer: g for g in self.original.groups}
        out = {}
        for gid, w in self.spec.widths.items():
            g0 = orig.get(self.analysis.groups[gid].producer)
            out[gid] = limited(g0, w.n_min, w.units) if g0 is not None else (w.n_min, w.units)
        return out

    def finalize(self, units: dict[int, int], present: dict[int, float]):
        """The gate-free supernet graph (with the weights training gave it) and the plan selecting the given
        widths and blocks from it: ``fxadapt.passes.materialize.apply_plan`` turns the pair into the model."""
        plain = strip_gates(self.gm).graph_module
        remove = {bid for bid, d in present.items() if d < 0.5}
        return plain, make_plan(self.analysis, units, remove=remove, scores=self.scores())


def build_supernet(a0: Analysis, inputs=None, cfg: SupernetConfig = SupernetConfig()) -> Supernet:
    """The gated supernet of an analysed model (``a0 = fxadapt.analyze(model, inputs)``; no second capture).

    >>> import torch, fxadapt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> x = torch.randn(1, 3, 8, 8)
    >>> sn = build_supernet(fxadapt.analyze(m, (x,)))
    >>> torch.allclose(sn.gm(x), m(x), atol=1e-6), sn.spec.widths[0].units
    (True, 12)
    """
    grow = {g.id: max(g.units,
                      min(math.ceil(cfg.expand * g.units), g.max_units or math.ceil(cfg.expand * g.units)))
            for g in a0.prunable if cfg.expand > 1 and growth_blocker(a0, g) is None}
    repeat = {b.id: cfg.depth_slots for b in a0.blocks
              if cfg.depth_slots and b.repeatable and repeat_blocker(a0.gm, b) is None}
    inputs = a0.gm.meta.get(meta.INPUTS, inputs)
    grown = apply_plan(a0.gm, make_plan(a0, grow, repeat=repeat)).graph_module
    shape_check(grown, inputs)
    a1 = apply_hold(analyze(grown), a0.hold)   # the user's held modules stay held in the supernet
    spec = _gate_spec(a0, a1, cfg)
    gm = insert_gates(a1.gm, a1, spec, GateConfig(kind=cfg.gates, top_k=cfg.top_k)).graph_module
    shape_check(gm, inputs)
    return Supernet(gm, a1, a0, spec, inputs)


def _gate_spec(a0: Analysis, a1: Analysis, cfg: SupernetConfig) -> GateSpec:
    orig = {g.producer: g.units for g in a0.groups}
    floor = {g.producer: g.min_units for g in a0.groups if g.min_units is not None}
    per_unit = {g.id: max(a1.cost.macs_grad(g.id), 1e-9) for g in a1.prunable}
    c = float(np.median([per_unit[g.id] * g.units for g in a1.prunable])) / cfg.bins if a1.prunable else 1.0
    widths = {}
    for g in a1.prunable:
        n_on = min(orig.get(g.producer, g.units), g.units)
        n_min = min(n_on, max(1, math.ceil(cfg.min_ratio * n_on), floor.get(g.producer, 1)))
        size = int(min(max(1, round(c / per_unit[g.id])), max(1, g.units // 2)))
        bins = _chunks(n_on - n_min, size) + _chunks(g.units - n_on, size)
        score = importance(a1, g)
        order = np.concatenate([np.argsort(-score[:n_on], kind="stable"),
                                n_on + np.argsort(-score[n_on:], kind="stable")])
        widths[g.id] = WidthSpec(torch.as_tensor(order), n_min, tuple(bins), n_on)
    nodes = {n.name: n for n in a1.gm.graph.nodes}
    depths = {b.id: meta.REPEAT_OF not in nodes[b.exit].meta for b in a1.blocks if b.removable}
    return GateSpec(widths, depths)


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - k) for k in range(0, n, size)] if n > 0 else []
