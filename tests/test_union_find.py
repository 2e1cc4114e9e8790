"""``fxadapt.ir.channels.UnionFind.union_arrays``: the partition equals the connected components of the
pairs (networkx, independent of the code), every set's root its smallest label."""

from __future__ import annotations

import networkx as nx
import numpy as np

from fxadapt.ir.channels import UnionFind


def test_union_arrays_matches_connected_components():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 200))
        uf, g = UnionFind(), nx.Graph()
        uf.new(n)
        g.add_nodes_from(range(n))
        for _ in range(int(rng.integers(1, 12))):
            shape = tuple(int(s) for s in rng.integers(1, 5, size=int(rng.integers(1, 3))))
            a = rng.integers(0, n, size=shape)
            b = rng.integers(0, n, size=shape[-1:] if rng.random() < 0.5 else shape)   # broadcast
            uf.union_arrays(a, b)
            ab = np.broadcast_arrays(a, b)
            g.add_edges_from(zip(ab[0].reshape(-1).tolist(), ab[1].reshape(-1).tolist()))
        want = np.empty(n, dtype=np.int64)
        for comp in nx.connected_components(g):
            want[list(comp)] = min(comp)
        np.testing.assert_array_equal(uf.roots(), want)
        assert all(uf.find(x) == want[x] for x in range(n))

