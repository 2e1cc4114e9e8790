"""Build the cost model's terms from an analysed graph (see ``fxadapt.cost`` for the formulas)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.fx import GraphModule

from fxadapt.ir.channels import ParamRef, Track
from fxadapt.analysis.cost import CostModel, LinearForm, Term
from fxadapt.analysis.propagate import normalize

aten = torch.ops.aten
CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
CONV_T = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
MATMUL = {aten.matmul.default, aten.mm.default, aten.bmm.default}
ADDMM = {aten.addmm.default, aten.baddbmm.default}


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


def _axis(t, axis: int):
    if not isinstance(t, Track) or axis not in t.axes:
        return None
    k = t.axes.index(axis)
    lab = np.moveaxis(t.labels, k, -1)
    return lab.reshape(-1, lab.shape[-1])[0]


def _weight_factors(ref: ParamRef, ctx, sites: dict, form: FormMaker) -> list[LinearForm]:
    shape = ctx.shape(ref)
    return [form(sites.get((ref.target, ax)), shape[ax]) for ax in range(len(shape))]


def _activation_factors(t, shape: tuple, form: FormMaker) -> tuple[float, list[LinearForm]]:
    """Constant part and variable factors of ``numel`` of a tensor with track ``t``."""
    coef, factors = 1.0, []
    free = t.axes[-1] if isinstance(t, Track) else None
    for ax, size in enumerate(shape):
        if ax == free:
            factors.append(form(_axis(t, ax), size))
        else:
            coef *= size
    return coef, factors


def _mac_term(node, call, ctx, sites, form) -> tuple[float, list[LinearForm]] | None:
    op, out = call.op, ctx.shapes.get(node.name)
    if op in CONV or op in CONV_T or op is aten.linear.default:
        w = call.arg(1, "weight")
        src = ctx.shapes[call.args[0].name] if op in CONV_T else out
        ch = src[1] if op is not aten.linear.default else src[-1]
        if op is aten.linear.default and isinstance(w, ParamRef):  # channels may sit on a leading axis
            t, coef, rows = ctx.tracks.get(node.name), 1.0, []  # (a linear over the width of NCHW)
            for ax, size in enumerate(out[:-1]):
                lab = _axis(t, ax)
                coef, rows = (coef * size, rows) if lab is None else (coef, rows + [form(lab, size)])
            return coef, rows + _weight_factors(w, ctx, sites, form)
        if not isinstance(w, ParamRef):  # weight computed at run time (a slice): the rule froze it, fixed size
            return math.prod(src) / ch, [LinearForm(float(s)) for s in ctx.shape(w)]
        return math.prod(src) / ch, _weight_factors(w, ctx, sites, form)
    if op in MATMUL or op in ADDMM:
        a = call.args[1] if op in ADDMM else call.args[0]
        k = ctx.shape(a)[-1]
        coef, factors = _activation_factors(ctx.tracks.get(node.name), out, form)
        return coef, factors + [form(_axis(ctx.track(a), len(ctx.shape(a)) - 1), k)]
    if op is aten.scaled_dot_product_attention.default:
        q, k, v = call.args[:3]
        qs, ks, vs = ctx.shape(q), ctx.shape(k), ctx.shape(v)
        e = form(_axis(ctx.track(q), len(qs) - 1), qs[-1]) + form(_axis(ctx.track(v), len(vs) - 1), vs[-1])
        return math.prod(qs[:-1]) * ks[-2], [e]
    if op is aten.einsum.default:  # no channel rule (its channels are frozen): a constant term
        return _einsum_macs(call.arg(0, "equation"), [ctx.shape(t) for t in call.arg(1, "tensors")])
    return None


def _einsum_macs(eq: str, shapes: list) -> tuple[float, list] | None:
    """MACs of a two-operand einsum as torch computes it (a bmm after summing letters only one side has)."""
    ins, arrow, out = eq.replace(" ", "").partition("->")
    ins = ins.split(",")
    if len(ins) != 2 or "." in eq or any(s is None for s in shapes):
        return None
    if not arrow:  # implicit output: the letters used once
        out = "".join(sorted(c for c in set(ins[0] + ins[1]) if (ins[0] + ins[1]).count(c) == 1))
    size = {c: d for term, shape in zip(ins, shapes) for c, d in zip(term, shape)}
    if not [c for c in size if c in ins[0] and c in ins[1] and c not in out]:
        return None  # nothing contracted: an element-wise product, no MACs
    used = [c for c in size if c in out or (c in ins[0] and c in ins[1])]
    return float(math.prod(size[c] for c in used)), []


def build_cost(gm: GraphModule, ctx, groups: list, roots, group_of, node_blocks: dict) -> CostModel:
    form = FormMaker(roots, group_of, groups)
    sites = {}
    for s in ctx.ledger.sites:
        if s.kind == "param":
            sites.setdefault((s.ref.target, s.axis), s.labels)
    macs, owner = [], {}
    for node in gm.graph.nodes:
        call = normalize(node)
        if call is None:
            continue
        for a in call.args:
            if isinstance(a, ParamRef):
                owner.setdefault(a.target, node.name)
        term = _mac_term(node, call, ctx, sites, form)
        if term is not None:
            macs.append(Term(term[0], tuple(term[1]), node_blocks.get(node.name, ()), node.name))
    params = []
    for name, p in gm.named_parameters():
        user = owner.get(name, "")
        ref = ParamRef(name)
        params.append(Term(1.0, tuple(_weight_factors(ref, ctx, sites, form)) if p.dim() else (),
                           node_blocks.get(user, ()), user))
    units = {g.id: g.units for g in groups if g.prunable}
    return CostModel(tuple(macs), tuple(params), units)
