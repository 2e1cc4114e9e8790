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

Differentiable evaluation (torch tensors as widths, e.g. a supernet's expected units): the terms are
compiled once into tensors (``Compiled``) — every distinct factor is a row ``const_f + A[f] @ n`` of one
matrix, a term is ``coef_t * prod_k v[F[t, k]] * prod_j d[B[t, j]]`` with index matrices padded by a
constant-1 entry — so the total is one gather/product/sum expression in float64, with no Python loop
over terms. On integer (hard 0/1) inputs it equals the loop exactly (every partial sum is an integer
below 2**53).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fxadapt.ops.forms import LinearForm

Sizes = Mapping[int, Any]   # group (or block) -> kept units (or presence): a number, or a 0-d tensor


@dataclass(frozen=True)
class Term:
    """``coef * prod(factors) * prod(d_b for b in blocks)``."""

    coef: float
    factors: tuple[LinearForm, ...]
    blocks: tuple[int, ...]
    node: str

    def value(self, n: Sizes, present: Sizes | None = None) -> float:
        v = self.coef
        for f in self.factors:
            v *= f.value(n)
        if present and self.blocks:
            v *= math.prod(present.get(b, 1.0) for b in self.blocks)
        return v

    def grad(self, g: int, n: Sizes, present: Sizes | None = None) -> float:
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

    _compiled: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def _n(self, n: Sizes | None) -> dict[int, Any]:
        base = dict(self.units)
        if n:
            base.update(n)
        return base

    def macs(self, n: Sizes | None = None, present: Sizes | None = None):
        """Total MACs (a float; a float64 tensor, differentiable, when any width or presence is a tensor)."""
        if _has_tensor(n, present):
            return self.compiled("macs")(self._n(n), present)
        full = self._n(n)
        return sum(t.value(full, present) for t in self.macs_terms)

    def params(self, n: Sizes | None = None, present: Sizes | None = None):
        if _has_tensor(n, present):
            return self.compiled("params")(self._n(n), present)
        full = self._n(n)
        return sum(t.value(full, present) for t in self.params_terms)

    def compiled(self, kind: str = "macs") -> Compiled:
        """The terms of ``kind`` as index/coefficient tensors (built once, cached)."""
        if kind not in self._compiled:
            self._compiled[kind] = Compiled.build(self.macs_terms if kind == "macs" else self.params_terms)
        return self._compiled[kind]

    def macs_grad(self, g: int, n: Sizes | None = None) -> float:
        full = self._n(n)
        return sum(t.grad(g, full) for t in self.macs_terms
                   if any(g == k for f in t.factors for k, _ in f.coefs))

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


def _has_tensor(*dicts) -> bool:
    return any(isinstance(v, torch.Tensor) for d in dicts if d for v in d.values())


@dataclass(frozen=True)
class Compiled:
    """Terms as tensors: ``v = const + A @ n`` over the distinct factors, then
    ``sum_t coef_t * prod_k v_ext[F[t, k]] * prod_j d_ext[B[t, j]]`` (``v_ext``/``d_ext`` end with a 1 that
    pads the index matrices). ``groups``/``blocks`` give the column order of ``n`` and ``d``.

    >>> t = Term(2.0, (LinearForm(1.0, ((0, 3.0),)), LinearForm(0.0, ((1, 1.0),))), (5,), "x")
    >>> c = Compiled.build((t,))
    >>> float(c({0: torch.tensor(2.0), 1: torch.tensor(4.0)}, {5: torch.tensor(1.0)})) == t.value({0: 2,
    ...                                                                                            1: 4})
    True
    """

    groups: tuple[int, ...]
    blocks: tuple[int, ...]
    const: torch.Tensor     # (F,)
    a: torch.Tensor         # (F, G)
    coef: torch.Tensor      # (T,)
    factors: torch.Tensor   # (T, K) long, F = padding (value 1)
    block_idx: torch.Tensor  # (T, J) long, len(blocks) = padding (value 1)

    @staticmethod
    def build(terms: Sequence[Term]) -> Compiled:
        groups = sorted({g for t in terms for f in t.factors for g, _ in f.coefs})
        blocks = sorted({b for t in terms for b in t.blocks})
        gcol, bcol = {g: i for i, g in enumerate(groups)}, {b: i for i, b in enumerate(blocks)}
        rows: dict[LinearForm, int] = {}
        for t in terms:
            for f in t.factors:
                rows.setdefault(f, len(rows))
        const = torch.zeros(len(rows), dtype=torch.float64)
        a = torch.zeros(len(rows), len(groups), dtype=torch.float64)
        for f, i in rows.items():
            const[i] = f.const
            for g, c in f.coefs:
                a[i, gcol[g]] += c
        k = max((len(t.factors) for t in terms), default=0)
        j = max((len(t.blocks) for t in terms), default=0)
        fidx = torch.full((len(terms), k), len(rows), dtype=torch.long)
        bidx = torch.full((len(terms), j), len(blocks), dtype=torch.long)
        for i, t in enumerate(terms):
            fidx[i, :len(t.factors)] = torch.tensor([rows[f] for f in t.factors], dtype=torch.long)
            bidx[i, :len(t.blocks)] = torch.tensor([bcol[b] for b in t.blocks], dtype=torch.long)
        coef = torch.tensor([t.coef for t in terms], dtype=torch.float64)
        return Compiled(tuple(groups), tuple(blocks), const, a, coef, fidx, bidx)

    def __call__(self, n: Sizes, present: Sizes | None = None) -> torch.Tensor:
        ref = next((v for d in (n, present) if d for v in d.values() if isinstance(v, torch.Tensor)), None)
        dev = ref.device if ref is not None else torch.device("cpu")
        one = torch.ones(1, dtype=torch.float64, device=dev)
        nv = _stack([n[g] for g in self.groups], dev)
        v = self.const.to(dev) + (self.a.to(dev) @ nv if len(self.groups) else 0.0)
        out = self.coef.to(dev) * torch.cat([v, one])[self.factors.to(dev)].prod(1)
        if self.blocks and present:
            d = _stack([present.get(b, 1.0) for b in self.blocks], dev)
            out = out * torch.cat([d, one])[self.block_idx.to(dev)].prod(1)
        return out.sum()


def _stack(values: list, dev) -> torch.Tensor:
    return torch.stack([torch.as_tensor(x, dtype=torch.float64, device=dev).reshape(()) for x in values]) \
        if values else torch.zeros(0, dtype=torch.float64, device=dev)
