"""Plans: which units of every group to keep or copy, and which blocks to remove or repeat.

A group's *selection* is an array of unit indices: the kept original units in increasing order, followed
by the source unit of every new (grown) unit. For each site the plan resolves the new positions:

- shrink: the positions whose unit is kept, in original order (so every tensor keeps a consistent
  order: producer, element-wise partners, consumers, flattened features and cat slices alike);
- grow: the copies of a group's units are appended right after that group's run of positions in the
  site (a cat of groups A and B becomes ``[A, A', B, B']``, which is what concatenating the grown
  tensors gives). This needs the group's positions to form one contiguous, unit-ordered run in every
  site; interleaved layouts (grouped convs, channel shuffles) and channel-mixing ops (reductions and
  norms over channels, activation-activation contractions) make a group not growable, with the reason.
  One exception: a group that is split into pieces (a fused ``qkv`` projection whose q, k and v heads
  are one group of whole heads) lies in several runs, one per piece, each holding every unit in order;
  the copies are appended after every run (``[q, q', k, k', v, v']``), so every piece grows alike; the
  gate blocks of a recurrent layer (``gates`` sites) likewise.

Importance (data-free): the L1 norm of each unit's producer weights, ``sum_p |W_p[unit]| / numel``, each
producer site normalised by its mean so convs of different fan-in weigh alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from fxadapt import meta
from fxadapt.ir.channels import Site
from fxadapt.ir.plan_types import Plan, SiteEdit
from fxadapt.ops.registry import spec_of
from fxadapt.ops.routing import EXPERTS_NO_GROWTH
from fxadapt.planning.l1 import Scratch, l1

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis
    from fxadapt.analysis.groups import Group


def positions(a: Analysis, site: Site) -> tuple[np.ndarray, np.ndarray]:
    """Group id and unit index of every position of a site (-1 where none)."""
    r = a.roots[site.labels]
    return a.group_of[r], a.unit_of[r]


def growth_blocker(a: Analysis, group: Group, preserve: bool = True) -> str | None:
    """Why a group cannot grow function-preservingly (``preserve=False``: why it cannot grow at all: a norm or
    reduction over its channels no longer blocks), or None."""
    if not group.prunable:
        return group.reason
    if group.top_k is not None:
        return EXPERTS_NO_GROWTH
    pieces = any(m.site.kind in ("split", "gates") for m in group.members)
    for m in group.members:
        if m.site.role == "mix" and preserve:
            return _mix_reason(a, m.site.node_name)
        runs = unit_runs(m.index)
        if runs is None or (len(runs) > 1 and not pieces):
            return f"channels are interleaved at {m.site.node_name} (grouped conv or shuffle layout)"
    return None


def _mix_reason(a: Analysis, node_name: str) -> str:
    node = next((n for n in a.gm.graph.nodes if n.name == node_name), None)
    what = getattr(spec_of(node), "name", "") if node is not None else ""
    if "norm" in what:
        return (f"{node_name} ({what}) normalises over these channels: new channels, even zero ones, change "
                f"its mean/variance statistics, so growth is not function-preserving")
    return f"channels are mixed at {node_name} (reduction/norm/contraction over channels)"


def unit_runs(index: np.ndarray) -> list[np.ndarray] | None:
    """The group's positions of a site split into runs (contiguous, unit order non-decreasing); None when
    the layout is interleaved: a run is not contiguous, or several runs do not each hold every unit.

    >>> [r.tolist() for r in unit_runs(np.array([-1, 0, 1, 0, 1]))]
    [[1, 2], [3, 4]]
    >>> unit_runs(np.array([0, 1, -1, 1])) is None
    True
    """
    pos = np.flatnonzero(index >= 0)
    if not pos.size:
        return []
    units = index[pos]
    cuts = np.flatnonzero((np.diff(pos) != 1) | (np.diff(units) < 0)) + 1
    runs = np.split(pos, cuts)
    if len(runs) == 1:
        return runs
    every = np.unique(units)
    ok = all(np.array_equal(np.unique(index[r]), every) for r in runs) and not np.any(np.diff(pos) != 1)
    return runs if ok else None


def importance(a: Analysis, group: Group, scratch: Scratch | None = None) -> np.ndarray:
    """Per-unit L1 importance of a group (see module docstring; ``scratch``: ``planning.l1.Scratch``)."""
    score = np.zeros(group.units)
    gm = a.gm
    for m in group.members:
        s = m.site
        if s.kind != "param" or s.role not in ("out", "dw") or s.ref is None:
            continue
        per_pos = l1(_get(gm, s.ref.target), s.axis, scratch=scratch)   # bounded memory (``planning.l1``)
        pos = m.index >= 0
        sums = np.bincount(m.index[pos], weights=per_pos[pos], minlength=group.units)
        score += sums / max(sums.mean(), 1e-12)
    return score


def _get(root, target: str) -> torch.Tensor:
    """The graph's tensor at ``target``; a graph captured on the meta device (a streamed checkpoint,
    ``fxadapt.export.stream``) reads its values with ``root.meta[meta.WEIGHTS]``."""
    read = getattr(root, "meta", {}).get(meta.WEIGHTS)
    if read is not None:
        return read(target)
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def select_units(a: Analysis, group: Group, n: int, score: np.ndarray | None = None,
                 scratch: Scratch | None = None) -> np.ndarray:
    """Selection of ``n`` units: the top-``n`` by importance (shrink), or all plus copies (grow)."""
    score = importance(a, group, scratch) if score is None else score
    order = np.argsort(-score, kind="stable")
    if n <= group.units:
        return np.sort(order[:n])
    extra = np.resize(order, n - group.units)
    return np.concatenate([np.arange(group.units), extra])


def make_plan(a: Analysis, units: dict[int, int], remove: Iterable[int] = (),
              repeat: dict[int, int] | None = None, scores: dict | None = None,
              preserve: bool = True) -> Plan:
    """Resolve a plan from kept-unit counts per group (groups left out keep all their units).

    ``scores`` (group id -> per-unit score, higher is kept first) overrides the L1 importance, e.g. with
    the order a searched gate used; ``preserve=False`` lets groups under a norm grow (not
    function-preserving)."""
    select, scratch = {}, Scratch()   # one float32 buffer for every weight's L1 (``planning.l1``)
    for g in a.groups:
        n = units.get(g.id, g.units)
        if n == g.units:
            continue
        if not g.prunable:
            raise ValueError(f"group {g.id} ({g.name}) is frozen: {g.reason}")
        if n > g.units and (why := growth_blocker(a, g, preserve)):
            raise ValueError(f"group {g.id} ({g.name}) cannot grow: {why}")
        select[g.id] = select_units(a, g, n, None if scores is None else scores.get(g.id), scratch)
    # a tensor axis is edited once, as its first site says: a tied tensor read as a consumer ("in": the LM
    # head) and a producer (the embedding) must zero its grown positions, so "in" sites come first
    sites = sorted(_sites(a), key=lambda s: s.role != "in")
    edits = tuple(_site_edit(a, s, select) for s in sites if _touched(a, s, select))
    return Plan(edits, {g.id: units.get(g.id, g.units) for g in a.groups}, frozenset(remove),
                dict(repeat or {}), tuple(a.blocks))


def _sites(a: Analysis) -> list[Site]:
    seen, out = set(), []
    for g in a.groups:
        for m in g.members:
            if id(m.site) not in seen:
                seen.add(id(m.site))
                out.append(m.site)
    return out


def _touched(a: Analysis, site: Site, select: dict) -> bool:
    g, _ = positions(a, site)
    return bool(np.isin(g, list(select)).any())


def _site_edit(a: Analysis, site: Site, select: dict) -> SiteEdit:
    """Kept positions in order (vectorised per group), with every grown copy inserted right after the run of
    its group it copies from."""
    g, u = positions(a, site)
    keep = np.ones(len(g), dtype=bool)
    run_end = {}  # last position of a run -> (positions of the run, source units of the copies)
    for gid in np.unique(g).tolist():
        sel = select.get(gid)
        if sel is None:
            continue
        units, here = a.groups[gid].units, g == gid
        if len(sel) <= units:
            keep[here] = np.isin(u[here], sel)
            continue
        for r in unit_runs(np.where(here, u, -1)) or [np.flatnonzero(here)]:
            run_end[int(r[-1])] = (r, sel[units:])
    kept = np.flatnonzero(keep)
    if not run_end:
        return SiteEdit(site, kept.astype(np.int64), np.zeros(len(kept), dtype=bool))
    index, new, start = [], [], 0
    for end in sorted(run_end):
        part = kept[(kept >= start) & (kept <= end)]
        run, extra = run_end[end]
        copies = np.concatenate([run[u[run] == src] for src in extra]) if len(extra) \
                else np.zeros(0, np.int64)
        index += [part, copies]
        new += [np.zeros(len(part), dtype=bool), np.ones(len(copies), dtype=bool)]
        start = end + 1
    index.append(kept[kept >= start])
    new.append(np.zeros(len(index[-1]), dtype=bool))
    return SiteEdit(site, np.concatenate(index).astype(np.int64), np.concatenate(new))
