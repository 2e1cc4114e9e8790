"""``M(n)``, the cost model's MAC polynomial, vectorised over candidate width assignments.

``fxadapt.analysis.cost`` writes ``M(n) = sum_t coef_t * prod_{j in t} L_j(n)`` with linear forms
``L_j(n) = c_j + sum_g F[j, g] n_g``. Stacking the forms of every term gives factor values ``V = c + F n``
(one row per form, plus a padding row fixed at 1 so that every term indexes the same number of factors),
and ``M = sum_t coef_t * prod_{j in idx_t} V_j`` for a whole batch of assignments in one product.
Changing group ``g`` by ``dn`` adds ``dn * F[:, g]`` to ``V``, so one-group moves (``singles``) and
two-group swaps (``pairs``) cost one rank-1 update each instead of a fresh ``F n``. ``present`` scales a
term by the presence of the blocks it lies in (a depth search's fixed block choices). A cost model without
``macs_terms`` is evaluated term by term through ``cost.macs``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fxadapt.analysis.cost import CostModel

_CHUNK = 2048


class MacsPoly:
    """``M(n)`` vectorised over candidate assignments (columns: every group of the cost model).

    >>> import torch, fxadapt
    >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)),
    ...                     (torch.randn(1, 3, 10, 10),))
    >>> p = MacsPoly(a.cost)
    >>> x = p.row({})
    >>> bool(p(x[None])[0] == a.cost.macs()), bool(p.singles(x, np.array([0]),
    ...                                                      np.array([4.0]))[0] == a.cost.macs({0: 4}))
    (True, True)
    """

    F: np.ndarray | None   # the factor matrix; None for an unfamiliar cost model (evaluated term by term)

    def __init__(self, cost: CostModel, present: dict | None = None):
        self.cost, self.present = cost, present
        self.cols = sorted(cost.units)
        self.col = {g: i for i, g in enumerate(self.cols)}
        self.base = np.array([cost.units[g] for g in self.cols], dtype=float)
        try:
            self._compile(cost.macs_terms, present)
        except (AttributeError, TypeError, KeyError):  # an unfamiliar cost model: evaluate it term by term
            self.F = None

    def _compile(self, terms, present) -> None:
        forms: list = []
        rows: list[list[int]] = []
        for t in terms:
            rows.append(list(range(len(forms), len(forms) + len(t.factors))))
            forms.extend(t.factors)
        pad, width = len(forms), max((len(r) for r in rows), default=0)
        self.F = np.zeros((pad + 1, len(self.cols)))
        self.c = np.zeros(pad + 1)
        self.c[pad] = 1.0
        for i, f in enumerate(forms):
            self.c[i] = f.const
            for g, v in f.coefs:
                self.F[i, self.col[g]] += v
        self.idx = np.array([r + [pad] * (width - len(r)) for r in rows], dtype=np.int64).reshape(len(rows),
                                                                                                  width)
        scale = [math.prod(present.get(b, 1.0) for b in t.blocks) if present else 1.0 for t in terms]
        self.coef = np.array([t.coef * s for t, s in zip(terms, scale)], dtype=float)

    def row(self, n: dict) -> np.ndarray:
        x = self.base.copy()
        for g, v in n.items():
            x[self.col[g]] = v
        return x

    def _total(self, V: np.ndarray) -> np.ndarray:
        out = np.empty(len(V))
        for s in range(0, len(V), _CHUNK):
            out[s:s + _CHUNK] = np.prod(V[s:s + _CHUNK][:, self.idx], axis=2) @ self.coef
        return out

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if self.F is None:
            return np.array([self.cost.macs(dict(zip(self.cols, r.tolist())), self.present) for r in X])
        return self._total(X @ self.F.T + self.c)

    def singles(self, x: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """``M`` with column ``cols[i]`` of ``x`` set to ``vals[i]``, for every ``i``."""
        if self.F is None:
            X = np.repeat(x[None], len(cols), 0)
            X[np.arange(len(cols)), cols] = vals
            return self(X)
        V = (x @ self.F.T + self.c) + (vals - x[cols])[:, None] * self.F[:, cols].T
        return self._total(V)

    def pairs(self, x: np.ndarray, ca, va, cb, vb) -> np.ndarray:
        """``M[i, j]`` with ``x[ca[i]] = va[i]`` and ``x[cb[j]] = vb[j]`` (``ca[i] != cb[j]``)."""
        if self.F is None:
            X = np.repeat(x[None], len(ca) * len(cb), 0).reshape(len(ca), len(cb), -1)
            X[np.arange(len(ca)), :, ca] = va[:, None]
            X[:, np.arange(len(cb)), cb] = vb[None, :]
            return self(X.reshape(-1, len(x))).reshape(len(ca), len(cb))
        v0 = x @ self.F.T + self.c
        A = (va - x[ca])[:, None] * self.F[:, ca].T
        B = (vb - x[cb])[:, None] * self.F[:, cb].T
        return self._total((v0 + A[:, None, :] + B[None, :, :]).reshape(-1, len(v0))).reshape(len(ca),
                                                                                              len(cb))
