"""Coupled channel groups from a propagation ledger.

Union-find classes of labels are *units* (channels that live or die together). Units that touch exactly the
same set of sites form one *group*: a prunable width. The group's canonical member is its first producer
site (a conv/linear output axis); unit order follows that member, so unit ``k`` is the producer's ``k``-th
channel. ``width`` counts the canonical member's channels and ``granularity = width / units`` (e.g. the
``groups`` of a grouped conv, or ``r^2`` before a pixel shuffle).

A group is frozen when any of its units was frozen by a rule; the first recorded reason is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fxadapt.ir.channels import Ledger, Site


@dataclass(frozen=True, eq=False)
class Member:
    """One place the group lives: a site, and per position the group unit it holds (-1: another group)."""

    site: Site
    index: np.ndarray

    @property
    def kind(self) -> str:
        return self.site.kind

    @property
    def target(self) -> str | None:
        return self.site.ref.target if self.site.ref is not None else None

    @property
    def axis(self) -> int:
        return self.site.axis

    def __repr__(self) -> str:
        where = self.target or self.site.node_name
        return f"Member({self.site.role} {where}[axis {self.axis}], {int((self.index >= 0).sum())} positions)"


@dataclass(frozen=True, eq=False)
class Group:
    id: int
    width: int
    units: int
    granularity: int
    members: tuple[Member, ...]
    prunable: bool
    reason: str | None
    roots: np.ndarray
    name: str = ""
    macs_share: float = 0.0
    params_share: float = 0.0
    min_units: int | None = None    # the user's limits (``fxadapt.analysis.hold``): fewest / most units kept
    max_units: int | None = None

    @property
    def top_k(self) -> int | None:
        """For an expert axis (``fxadapt.ops.routing``: whole experts are its units) the experts a token is
        routed to, the fewest that may stay; None for a channel group."""
        ks = [m.site.index for m in self.members if m.site.kind == "experts"]
        return max(ks) if ks else None

    @property
    def producer(self) -> str | None:
        """The group's identity across graphs: its first producer's parameter name (with ``@axis`` when that
        is not axis 0: a tied embedding/LM-head tensor produces two groups, hidden on axis 1, vocab on 0)."""
        m = next((m for m in self.members if m.site.role in PRODUCER_ROLES and m.site.ref is not None), None)
        if m is None or m.site.ref is None:
            return None
        return m.site.ref.target if m.axis == 0 else f"{m.site.ref.target}@{m.axis}"

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"frozen: {self.reason}"
        return f"Group({self.id} {self.name!r}, width={self.width}, granularity={self.granularity}, {state})"


PRODUCER_ROLES = ("out", "dw")


@dataclass
class _Forming:
    """What the groups of one ledger are formed from: its sites, the union-find root of every label, the
    frozen roots with their reasons, and the per-root ``group_of`` / ``unit_of`` maps being filled, plus
    per site index the (group, unit) of each of its positions (``mapped``)."""

    sites: list[Site]
    roots: np.ndarray
    frozen: dict[int, str]
    group_of: np.ndarray
    unit_of: np.ndarray
    mapped: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def form_groups(ledger: Ledger) -> tuple[list[Group], np.ndarray, np.ndarray]:
    """Groups, plus per-root arrays ``group_of`` and ``unit_of`` (-1 where a root has no group)."""
    roots = ledger.uf.roots()
    frozen: dict[int, str] = {}
    for labels, reason in ledger.frozen:
        for r in np.unique(roots[labels]).tolist():
            frozen.setdefault(r, reason)
    f = _Forming(ledger.sites, roots, frozen, np.full(len(roots), -1, dtype=np.int64),
                 np.full(len(roots), -1, dtype=np.int64))
    classes = _signature_classes(f.sites, roots)
    # two phases: unit order of every group first, then members (a site's group/unit map is computed once;
    # groups own disjoint roots, so reading the final group_of / unit_of is the same as reading them early)
    orders = [_order_units(f, gid, key, rs) for gid, (key, rs) in enumerate(classes)]
    for key, _ in classes:
        for i in key:
            if i not in f.mapped:
                r = roots[f.sites[i].labels]
                f.mapped[i] = (f.group_of[r], f.unit_of[r])
    groups = [_make_group(f, gid, key, order)
              for gid, ((key, _), order) in enumerate(zip(classes, orders, strict=True))]
    return groups, f.group_of, f.unit_of


def _signature_classes(sites: list[Site], roots: np.ndarray) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Roots grouped by the exact (ascending) tuple of site indices they touch, and by how many positions
    they hold in each (units of a group are interchangeable in every site), vectorised.

    Classes come in order of (first site, smallest root), i.e. the order in which a scan of the sites
    first meets them; the roots of a class are ascending.

    >>> from fxadapt.ir.channels import Site
    >>> sites = [Site("param", np.array([0, 1, 2]), "out", "a"), Site("param", np.array([1, 2]), "in", "b")]
    >>> [(key, rs.tolist()) for key, rs in _signature_classes(sites, np.arange(3))]
    [((0,), [0]), ((0, 1), [1, 2])]
    """
    cls = np.zeros(len(roots), dtype=np.int64)  # partition refinement: class 0 = "touches no site yet"
    class_sites: list[tuple[int, ...]] = [()]
    for si, site in enumerate(sites):
        r = roots[site.labels.reshape(-1)]
        # split every class the site meets into (in site, not in site); sort-based (np.unique is slow)
        c = cls[r]
        # ... and by positions per root in the site: a cost must depend on the number of kept units only
        span = len(r) + 1
        by_root = np.argsort(r, kind="stable")
        starts = np.flatnonzero(np.r_[True, r[by_root][1:] != r[by_root][:-1]])
        mult = np.empty(len(r), dtype=np.int64)
        mult[by_root] = np.repeat(np.diff(np.r_[starts, len(r)]), np.diff(np.r_[starts, len(r)]))
        c = c * span + mult
        order = np.argsort(c, kind="stable")
        step = np.r_[True, c[order][1:] != c[order][:-1]]
        inv = np.empty(len(c), dtype=np.int64)
        inv[order] = np.cumsum(step) - 1
        cls[r] = len(class_sites) + inv  # a root repeated in the site gets the same new class each time
        class_sites.extend(class_sites[k // span] + (si,) for k in c[order][step].tolist())
    seen = cls > 0
    ids, first = np.unique(cls[seen], return_index=True)  # cls[seen] is in root order: first = min root
    if not ids.size:
        return []
    min_root = np.flatnonzero(seen)[first]
    order = np.lexsort((min_root, [class_sites[c][0] for c in ids.tolist()]))
    members = np.flatnonzero(seen)[np.argsort(cls[seen], kind="stable")]
    bounds = np.r_[0, np.cumsum(np.bincount(np.searchsorted(ids, cls[seen]), minlength=len(ids)))]
    return [(class_sites[ids[k]], members[bounds[k]:bounds[k + 1]]) for k in order.tolist()]


def _order_units(f: _Forming, gid: int, key: tuple[int, ...], rs: np.ndarray) -> tuple[Site, np.ndarray, int]:
    """Canonical site, unit order (the canonical member's channel order, then the rest) and width of a group;
    writes the group's entries of ``f.group_of`` / ``f.unit_of``."""
    roots = f.roots
    members_sites = [f.sites[i] for i in key]
    canon = next((s for s in members_sites if s.role in PRODUCER_ROLES), members_sites[0])
    in_group = np.isin(roots[canon.labels], rs)
    canon_roots = roots[canon.labels][in_group]
    _, first = np.unique(canon_roots, return_index=True)
    ordered = canon_roots[np.sort(first)]
    missing = np.setdiff1d(np.asarray(rs), ordered)
    ordered = np.concatenate([ordered, missing])
    f.group_of[ordered] = gid
    f.unit_of[ordered] = np.arange(len(ordered))
    return canon, ordered, int(in_group.sum())


def _make_group(f: _Forming, gid: int, key: tuple[int, ...], order: tuple[Site, np.ndarray, int]) -> Group:
    """The group ``gid`` over the sites ``key``, from its canonical site, unit order and width (``order``)."""
    canon, ordered, width = order
    frozen = f.frozen
    members = []
    for i in key:
        g, u = f.mapped[i]
        members.append(Member(f.sites[i], np.where(g == gid, u, -1)))
    units = len(ordered)
    reason = next((frozen[r] for r in ordered.tolist() if r in frozen), None) if frozen else None
    if reason is None and units == 1:
        reason = "a single unit: nothing to choose"
    name = (canon.ref.module_path or canon.ref.target) if canon.ref is not None else canon.node_name
    return Group(gid, width, units, max(1, width // max(units, 1)), tuple(members), reason is None, reason,
                 ordered, name)
