"""A reference channel slicer for tests, written from the documented meaning of groups and sites only.

It does not use fxadapt's materializer: given an ``Analysis`` and, for every prunable group, the set of
units to keep, it works out for every site which positions survive (a position belongs to exactly one
group: the one whose member ``index`` is >= 0 there; positions of frozen groups always survive) and then
rewrites a *copy* of the captured graph module:

- ``param``: index-select the parameter/buffer along ``site.axis``; module attributes (conv in/out
  channels, linear features, norm sizes) are then recomputed from the new tensor shapes;
- ``groups``: the conv's ``groups`` becomes the number of kept positions (depthwise);
- ``shape_arg``: entry ``site.index`` of the shape list at ``node.args[site.arg]`` (or a lifted
  ``LayerNorm``'s ``normalized_shape``) becomes the kept count;
- ``split``: the split/chunk becomes ``split_with_sizes`` with the kept count of every piece;
- ``slice``: start/end (``site.arg``/``site.index``) become kept counts before them.

A wrong group (a coupling the rules missed) then shows up as a shape error when the sliced module runs, and
a wrong coupling that still fits shapes shows up as a numeric mismatch against ``masked`` (the original
module with the weights that read dropped channels zeroed).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

SLICED = ("param", "shape_arg", "groups", "split", "slice")


def owners(analysis) -> dict[int, tuple]:
    """``id(site) -> (site, group_of_position, unit_of_position)``; asserts the groups partition every
    site."""
    out: dict[int, tuple] = {}
    for g in analysis.groups:
        for m in g.members:
            s = m.site
            if s.kind not in SLICED:
                continue
            assert m.index.shape == s.labels.shape, (g, m)
            _, gof, uof = out.setdefault(id(s), (s, np.full(len(m.index), -1), np.full(len(m.index), -1)))
            hit = m.index >= 0
            assert not (gof[hit] >= 0).any(), f"position of {m} claimed by two groups"
            assert (m.index[hit] < g.units).all(), (g, m)
            gof[hit] = g.id
            uof[hit] = m.index[hit]
    for s, gof, _ in out.values():
        assert (gof >= 0).all(), f"site {s.kind} {s.role} at {s.node_name} has positions in no group"
    return out


def site_masks(analysis, keep: dict[int, set[int]]) -> dict[int, tuple]:
    """``id(site) -> (site, bool mask of surviving positions)`` for keep-sets (in units) of prunable
    groups."""
    masks = {}
    for key, (s, gof, uof) in owners(analysis).items():
        mask = np.ones(len(gof), dtype=bool)
        for gid, units in keep.items():
            here = gof == gid
            mask[here] = np.isin(uof[here], sorted(units))
        masks[key] = (s, mask)
    return masks


def _get(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_tensor(root: nn.Module, target: str, value: torch.Tensor) -> None:
    path, _, leaf = target.rpartition(".")
    owner = root.get_submodule(path) if path else root
    if isinstance(getattr(owner, leaf), nn.Parameter):
        setattr(owner, leaf, nn.Parameter(value, requires_grad=getattr(owner, leaf).requires_grad))
    else:
        owner.register_buffer(leaf, value)


def _fix_module(m: nn.Module) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = m.running_mean if m.running_mean is not None else m.weight
        m.num_features = ref.shape[0]
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = m.weight.shape[0]
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def slice_module(analysis, keep: dict[int, set[int]]) -> GraphModule:
    """A sliced deep copy of ``analysis.gm`` (see module docstring)."""
    gm = copy.deepcopy(analysis.gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    masks = site_masks(analysis, keep)
    params: dict[tuple[str, int], np.ndarray] = {}
    shape_args: dict[tuple[str, int, int], int] = {}
    for s, mask in masks.values():
        if s.kind == "param":
            prev = params.setdefault((s.ref.target, s.axis), mask)
            assert np.array_equal(prev, mask), f"two sites of {s.ref.target} axis {s.axis} disagree"
        elif s.kind == "shape_arg":
            prev = shape_args.setdefault((s.node_name, s.arg, s.index), int(mask.sum()))
            assert prev == int(mask.sum()), f"two shape sites of {s.node_name} disagree"
    for (target, axis), mask in params.items():
        t = _get(gm, target)
        assert t.shape[axis] == len(mask), (target, axis, tuple(t.shape), len(mask))
        idx = torch.as_tensor(np.flatnonzero(mask), dtype=torch.long)
        _set_tensor(gm, target, t.detach().index_select(axis, idx).clone())
    for s, mask in masks.values():
        node = nodes[s.node_name]
        if s.kind == "groups" and node.op == "call_function":   # a conv left unlifted (computed weight)
            node.args = tuple(int(mask.sum()) if i == s.arg else a for i, a in enumerate(node.args))
        elif s.kind == "groups":
            gm.get_submodule(node.target).groups = int(mask.sum())
        elif s.kind == "split":
            dim = s.arg
            sizes = [int(v.shape[dim]) for v in node.meta["val"]]
            bounds = np.cumsum([0] + sizes)
            new = [int(mask[bounds[i]:bounds[i + 1]].sum()) for i in range(len(sizes))]
            node.target = torch.ops.aten.split_with_sizes.default
            node.args, node.kwargs = (node.args[0], new, dim), {}
        elif s.kind == "slice":
            args = list(node.args)
            assert node.target == torch.ops.aten.slice.Tensor, node.target
            while len(args) < 4:
                args.append(None)
            args[2], args[3] = int(mask[:s.arg].sum()), int(mask[:s.index].sum())
            node.args = tuple(args)
    for (name, arg, index), count in shape_args.items():
        node = nodes[name]
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            assert isinstance(mod, nn.LayerNorm), type(mod)
            ns = list(mod.normalized_shape)
            ns[index] = count
            mod.normalized_shape = tuple(ns)
        else:
            args = list(node.args)
            shape = list(args[arg])
            assert isinstance(shape[index], int), (name, shape, index)
            shape[index] = count
            args[arg] = shape
            node.args = tuple(args)
    for m in gm.modules():
        _fix_module(m)
    gm.graph.lint()
    gm.recompile()
    return gm


def masked(analysis, keep: dict[int, set[int]]) -> GraphModule:
    """A deep copy of ``analysis.gm`` whose ``in`` weights ignore dropped channels (zeroed, not removed)."""
    gm = copy.deepcopy(analysis.gm)
    for s, mask in site_masks(analysis, keep).values():
        if s.kind == "param" and s.role == "in":
            t = _get(gm, s.ref.target)
            drop = torch.as_tensor(np.flatnonzero(~mask), dtype=torch.long)
            with torch.no_grad():
                t.index_fill_(s.axis, drop, 0.0)
    return gm


def widths(analysis, keep: dict[int, set[int]]) -> dict[int, int]:
    """Group widths (channels) for keep-sets, as ``Analysis.macs`` takes them."""
    return {gid: len(units) * analysis.groups[gid].granularity for gid, units in keep.items()}


# --- comparing fxadapt's materializer with the reference --------------------------------------------------
#
# A *selection* of a group is a multiset of its units: the kept units once each, plus one more for every
# grown copy of a unit. A site position of unit ``u`` then appears ``count(u)`` times in the materialized
# tensor, so every parameter axis has ``sum_p count(unit(p))`` entries (frozen and untouched groups count 1).


def selections(units: dict[int, int], scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """The documented selection rule, written out: keep the top-``n`` scores, or all units plus copies of
    the highest-scored units in order (cycling) when ``n`` exceeds the group's units."""
    out = {}
    for gid, n in units.items():
        order = sorted(range(len(scores[gid])), key=lambda u: -scores[gid][u])
        extra = [order[k % len(order)] for k in range(max(0, n - len(order)))]
        out[gid] = np.array(sorted(order[:n]) + extra, dtype=np.int64)
    return out


def param_shapes(analysis, select: dict[int, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Expected shape of every parameter/buffer with a sliced site, for group selections."""
    shapes: dict[str, list[int]] = {}
    for s, gof, uof in owners(analysis).values():
        if s.kind != "param":
            continue
        count = np.ones(len(gof), dtype=np.int64)
        for gid, sel in select.items():
            here = gof == gid
            count[here] = np.bincount(sel, minlength=analysis.groups[gid].units)[uof[here]]
        shape = shapes.setdefault(s.ref.target, list(_get(analysis.gm, s.ref.target).shape))
        shape[s.axis] = int(count.sum())
    return {k: tuple(v) for k, v in shapes.items()}


def kept_from_plan(analysis, plan) -> dict[int, set[int]]:
    """Kept (not grown) units per group, read back from a plan's site edits; every site must agree."""
    own = owners(analysis)
    seen: dict[int, list[set[int]]] = {}
    for e in plan.edits:
        if id(e.site) not in own:
            continue
        _, gof, uof = own[id(e.site)]
        src = e.index[~e.new]
        for gid in np.unique(gof).tolist():
            seen.setdefault(gid, []).append(set(uof[src][gof[src] == gid].tolist()))
    for gid, sets in seen.items():
        assert all(k == sets[0] for k in sets), f"group {gid}: its sites keep different units {sets}"
    return {gid: sets[0] for gid, sets in seen.items()}


def assert_same_function(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal at float64 precision relative to the output's scale."""
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")
