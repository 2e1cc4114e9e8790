"""Cost model: MACs and parameter counts as polynomials in the group widths and block presences.

Let ``n_g`` be the number of kept units (channel classes) of group ``g`` and ``d_b`` in {0, 1} the presence
of removable block ``b``. The size of any sliced axis is a linear form ``c0 + sum_g m_g n_g`` (``m_g`` =
positions per unit of ``g`` on that axis: 1 for a conv channel, ``H*W`` after a flatten, ``groups`` for a
grouped conv; ``c0`` counts frozen positions). Then

- params = sum over parameters ``prod_axes size(axis)`` (times ``prod d_b`` of the blocks that use it);
- conv/linear MACs = (output numel / output channels) * prod_axes size(weight axis) (transposed conv:
  input numel / input channels), i.e. every weight element is used once per output position;
- matmul MACs = numel(out) * k; scaled-dot-product attention MACs = b*h*L*S*(E + Ev);

each term multiplied by ``prod d_b`` over the removable blocks whose body holds the node. This counts
exactly what ``torch.utils.flop_counter.FlopCounterMode`` counts (conv, mm, addmm, bmm, baddbmm, sdpa)
divided by 2. The share of group ``g`` in the MACs is ``n_g * dM/dn_g / M`` (Network Adjustment's ``F_l``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LinearForm:
    """``const + sum(coef * n[g])``: the size of one tensor axis as a function of kept units."""

    const: float
    coefs: tuple[tuple[int, float], ...] = ()

    def value(self, n: dict[int, float]) -> float:
        return self.const + sum(c * n[g] for g, c in self.coefs)

    def __add__(self, other: LinearForm) -> LinearForm:
        merged: dict[int, float] = dict(self.coefs)
        for g, c in other.coefs:
            merged[g] = merged.get(g, 0.0) + c
        return LinearForm(self.const + other.const, tuple(sorted(merged.items())))


@dataclass(frozen=True)
class Term:
    """``coef * prod(factors) * prod(d_b for b in blocks)``."""

    coef: float
    factors: tuple[LinearForm, ...]
    blocks: tuple[int, ...]
    node: str

    def value(self, n: dict[int, float], present: dict[int, float] | None = None) -> float:
        v = self.coef
        for f in self.factors:
            v *= f.value(n)
        if present and self.blocks:
            v *= math.prod(present.get(b, 1.0) for b in self.blocks)
        return v

    def grad(self, g: int, n: dict[int, float], present: dict[int, float] | None = None) -> float:
        """d value / d n_g (product rule over factors)."""
        vals = [f.value(n) for f in self.factors]
        total = 0.0
        for i, f in enumerate(self.factors):
            c = dict(f.coefs).get(g, 0.0)
            if c:
                total += c * math.prod(vals[:i] + vals[i + 1:])
        scale = self.coef * (math.prod(present.get(b, 1.0) for b in self.blocks) if present else 1.0)
        return scale * total


@dataclass(frozen=True)
class CostModel:
    """MACs and params of a graph as functions of kept units per group and block presence.

    Example:
        >>> import torch, fxadapt
        >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)),
        ...                     (torch.randn(1, 3, 10, 10),))
        >>> a.cost.macs() == 3 * 8 * 9 * 64 + 8 * 4 * 64
        True
    """

    macs_terms: tuple[Term, ...]
    params_terms: tuple[Term, ...]
    units: dict  # group id -> original number of units

    def _n(self, n: dict[int, float] | None) -> dict[int, float]:
        base = dict(self.units)
        if n:
            base.update(n)
        return base

    def macs(self, n: dict[int, float] | None = None, present: dict[int, float] | None = None) -> float:
        full = self._n(n)
        return sum(t.value(full, present) for t in self.macs_terms)

    def params(self, n: dict[int, float] | None = None, present: dict[int, float] | None = None) -> float:
        full = self._n(n)
        return sum(t.value(full, present) for t in self.params_terms)

    def macs_grad(self, g: int, n: dict[int, float] | None = None) -> float:
        full = self._n(n)
        return sum(t.grad(g, full) for t in self.macs_terms if any(g == k for f in t.factors for k, _ in f.coefs))

    def shares(self, kind: str = "macs") -> dict[int, float]:
        """``share(g)`` for every group in one pass over the terms."""
        terms = self.macs_terms if kind == "macs" else self.params_terms
        full = self._n(None)
        total = sum(t.value(full) for t in terms) or 1.0
        out: dict[int, float] = {}
        for t in terms:
            for g in {k for f in t.factors for k, _ in f.coefs}:
                out[g] = out.get(g, 0.0) + t.grad(g, full)
        return {g: full.get(g, 0) * v / total for g, v in out.items()}

    def share(self, g: int, kind: str = "macs") -> float:
        """Fraction of the total attributable to group ``g``: ``n_g * dC/dn_g / C``."""
        terms = self.macs_terms if kind == "macs" else self.params_terms
        full = self._n(None)
        total = sum(t.value(full) for t in terms) or 1.0
        grad = sum(t.grad(g, full) for t in terms if any(g == k for f in t.factors for k, _ in f.coefs))
        return full.get(g, 0) * grad / total
