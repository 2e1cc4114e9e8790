"""Build the cost model's terms from an analysed graph: one MAC term per node whose registry entry has a
cost formula (``fxadapt.ops.costs``), one parameter term per parameter (see ``fxadapt.analysis.cost``)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.fx import GraphModule, Node

from fxadapt.analysis.cost import CostModel, Term
from fxadapt.analysis.propagate import normalize
from fxadapt.ir.channels import ParamRef, Track
from fxadapt.ops.core import Ctx
from fxadapt.ops.forms import LinearForm
from fxadapt.ops.registry import spec_of


class FormMaker:
    """Turns a label array (positions of one axis) into a ``LinearForm`` over prunable groups."""

    def __init__(self, roots: np.ndarray, group_of: np.ndarray, groups: list):
        self.roots, self.group_of = roots, group_of
        self.units = {g.id: g.units for g in groups if g.prunable}

    def __call__(self, labels: np.ndarray | None, size: int) -> LinearForm:
        if labels is None:
            return LinearForm(float(size))
        g = self.group_of[self.roots[labels.reshape(-1)]]
        counts = np.bincount(g + 1)  # index 0 counts positions of no group
        coefs, const = [], float(counts[0]) if len(counts) else 0.0
        for i in np.flatnonzero(counts[1:]).tolist():
            if i in self.units:
                coefs.append((i, float(counts[i + 1]) / self.units[i]))
            else:
                const += float(counts[i + 1])
        return LinearForm(const, tuple(coefs))


def axis_labels(t, axis: int):
    """1-D labels of ``t`` along ``axis`` (None when the axis carries no channels)."""
    if not isinstance(t, Track) or axis not in t.axes:
        return None
    k = t.axes.index(axis)
    lab = np.moveaxis(t.labels, k, -1)
    return lab.reshape(-1, lab.shape[-1])[0]


class CostCtx:
    """What a cost formula sees: shapes, tracks, and axis sizes as linear forms in the group widths."""

    def __init__(self, ctx: Ctx, sites: dict, form: FormMaker):
        self.ctx, self.sites, self.form = ctx, sites, form
        self.node: Node | None = None

    @property
    def out_shape(self):
        return self.ctx.shapes.get(self.node.name)

    def shape(self, x: Any) -> tuple[int, ...] | None:
        return self.ctx.shape(x)

    def track(self, x: Any) -> Track | None:
        return self.ctx.tracks.get(x.name) if isinstance(x, Node) else None

    @staticmethod
    def const(size: float) -> LinearForm:
        return LinearForm(float(size))

    def axis_form(self, t: Track | None, axis: int, size: int, default: bool = False) -> LinearForm | None:
        """The size of ``axis`` of a tensor with track ``t``; None (or constant with ``default``) if
        untracked."""
        lab = axis_labels(t, axis)
        if lab is None:
            return LinearForm(float(size)) if default else None
        return self.form(lab, size)

    def weight_factors(self, ref: ParamRef) -> list[LinearForm]:
        shape = self.ctx.shape(ref)
        assert shape is not None, ref   # a parameter's shape is always known
        return [self.form(self.sites.get((ref.target, ax)), shape[ax]) for ax in range(len(shape))]

    def activation_factors(self, t: Track | None, shape: tuple) -> tuple[float, list[LinearForm]]:
        """Constant part and variable factors of ``numel`` of a tensor with track ``t``."""
        coef, factors = 1.0, []
        free = t.axes[-1] if isinstance(t, Track) else None
        for ax, size in enumerate(shape):
            if ax == free:
                factors.append(self.form(axis_labels(t, ax), size))
            else:
                coef *= size
        return coef, factors


def build_cost(gm: GraphModule, ctx: Ctx, groups: list, roots: np.ndarray, group_of: np.ndarray,
               node_blocks: dict) -> CostModel:
    form = FormMaker(roots, group_of, groups)
    sites: dict[tuple[str, int], np.ndarray] = {}
    for s in ctx.ledger.sites:
        if s.kind == "param" and s.ref is not None:
            sites.setdefault((s.ref.target, s.axis), s.labels)
    cx = CostCtx(ctx, sites, form)
    macs: list = []
    owner: dict = {}
    for node in gm.graph.nodes:
        call = normalize(node)
        if call is None:
            continue
        for a in call.args:
            if isinstance(a, ParamRef):
                owner.setdefault(a.target, node.name)
        spec = spec_of(node)
        if spec is None or spec.cost is None:
            continue
        cx.node = node
        term = spec.cost(call, cx)
        if term is not None:
            macs.append(Term(term[0], tuple(term[1]), node_blocks.get(node.name, ()), node.name))
    params = []
    for name, p in gm.named_parameters():
        user = owner.get(name, "")
        factors = tuple(cx.weight_factors(ParamRef(name))) if p.dim() else ()
        params.append(Term(1.0, factors, node_blocks.get(user, ()), user))
    units = {g.id: g.units for g in groups if g.prunable}
    return CostModel(tuple(macs), tuple(params), units)
