"""Channel labels: the element-level bookkeeping behind coupled channel groups.

Every channel a producer (conv, linear, embedding, ...) creates gets a unique integer *label*. A tensor's
``Track`` says which of its axes carry channels and, for every position along those axes, which label sits
there. Op rules move labels (pass-through, cat, split, permute, view), *couple* them (``a + b`` forces the
channel at position i of ``a`` and of ``b`` to be kept or dropped together: their labels are unioned), or
*freeze* them (an op we cannot rewrite consumes them).

After propagation, the union-find classes of labels are the *group channels*; classes touching the same
set of sites (the places that must be sliced: weights, norm parameters, shape arguments) form one group.
A site's ``labels`` array maps each of its positions to a class, so one group can be a slice of a
concatenation, a strided subset after a channel shuffle, or a block of ``H*W`` features after a flatten.

Invariant: a tracked axis is never mixed with untracked content, so selecting, in every site, the
positions whose class is kept (in original order) yields tensors that still fit together.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True, eq=False)
class Track:
    """Channel labels carried by a tensor.

    ``axes`` are sorted non-negative tensor axes; ``labels`` has shape ``[size(a) for a in axes]``. Along
    every other axis the labels are constant (the channel axis of an NCHW activation is ``axes == (1,)``).

    >>> t = Track((1,), np.arange(4))
    >>> t.moved({1: 2}).axes
    (2,)
    """

    axes: tuple[int, ...]
    labels: np.ndarray

    def moved(self, mapping: dict[int, int]) -> Track:
        """Rename axes (old -> new), keeping labels aligned with sorted axis order."""
        new = [mapping[a] for a in self.axes]
        order = np.argsort(new)
        return Track(tuple(int(new[i]) for i in order), np.transpose(self.labels, order))

    def flat(self) -> np.ndarray:
        return self.labels.reshape(-1)


class UnionFind:
    """Union-find over integer labels, with path halving (labels are allocated densely from 0)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union ``a[i]`` with ``b[i]`` (broadcast) for every i; each distinct pair once (the roots, each
        set's smallest label, do not depend on the order)."""
        a, b = (x.reshape(-1) for x in np.broadcast_arrays(np.asarray(a, np.int64), np.asarray(b, np.int64)))
        a, b = a[a != b], b[a != b]
        n = np.int64(max(len(self.parent), 1))
        pairs: Iterable[tuple[int, int]]
        if a.size and min(a.min(), b.min()) >= 0 and max(a.max(), b.max()) < n:
            keys = np.unique(a * n + b)   # one key a pair: labels are allocated below len(parent)
            pairs = zip((keys // n).tolist(), (keys % n).tolist())
        else:
            pairs = dict.fromkeys(zip(a.tolist(), b.tolist()))
        for x, y in pairs:
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def roots(self) -> np.ndarray:
        """The root of every label (vectorised pointer jumping; ``self.parent`` is left as is).

        >>> uf = UnionFind(); _ = uf.new(4); uf.union_arrays(np.array([3, 2]), np.array([2, 1]))
        >>> uf.roots().tolist()
        [0, 1, 1, 1]
        """
        p = np.asarray(self.parent, dtype=np.int64)
        while True:
            q = p[p]
            if np.array_equal(q, p):
                return p
            p = q


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer of the graph module, by fully qualified name (``"layer1.0.conv1.weight"``)."""

    target: str

    @property
    def module_path(self) -> str:
        return self.target.rpartition(".")[0]


@dataclass(frozen=True, eq=False)
class Site:
    """A place that must change when channels are kept or added.

    kind: ``"param"`` (slice ``ref`` along ``axis``), ``"shape_arg"`` (entry ``index`` of the shape list at
    argument ``arg`` of ``node_name``), ``"groups"`` (the ``groups`` of a depthwise conv follows its input),
    ``"split"``/``"slice"`` (sizes / bounds of a split or slice on the channel axis). Informational kinds
    change nothing but separate groups: ``"piece"`` (one output of a split, the kept run of a slice: a
    group never spans two pieces, so a kept unit leaves no piece empty) and ``"mix"`` (channels mixed by a
    reduction, norm or contraction). ``labels`` gives, for every position along the axis, its channel label.
    ``role`` tells the cost model and reports what the site is (``"out"``, ``"in"``, ``"norm"``, ``"bias"``,
    ``"const"``, ``"shape"``).
    """

    kind: str
    labels: np.ndarray
    role: str
    node_name: str
    ref: ParamRef | None = None
    axis: int = 0
    arg: int = 0
    index: int = 0

    @property
    def param(self) -> str:
        """The parameter a ``"param"`` site slices (its ``ref.target``; every param site has a ``ref``)."""
        assert self.ref is not None, f"{self.kind} site of {self.node_name} has no parameter"
        return self.ref.target

@dataclass
class Ledger:
    """Everything a propagation run learns: label unions, frozen labels with reasons, and sites."""

    uf: UnionFind = field(default_factory=UnionFind)
    frozen: list[tuple[np.ndarray, str]] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        self.uf.union_arrays(a, b)

    def freeze(self, labels: np.ndarray, reason: str) -> None:
        if labels.size:
            self.frozen.append((labels.reshape(-1), reason))
