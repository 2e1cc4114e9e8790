"""``einsum``: a channel rule and a MAC formula derived from the equation.

An equation names every axis of every operand by a letter (``...`` expands to unnamed letters aligned from
the right, as broadcasting aligns them). For one letter, the positions of every operand that has it at a
size above one meet element by element, so:

- a letter tracked on several operands (a batch letter, or a contracted one) couples their labels
  position by position; a contracted tracked letter is also a ``mix`` site (its channels are summed over);
- a letter tracked on one operand and held by a *parameter* operand slices that parameter along its axis
  (role ``in`` when contracted, ``const`` when it reaches the output);
- a letter tracked on one operand and held at a fixed size by another activation freezes its channels
  (the two would no longer line up), with a reason naming the letter and the operand;
- a letter only a parameter holds that reaches the output is a new channel space (the parameter's ``out``
  axis: ``einsum("bld,hd->blh", x, W)`` is a linear layer);
- the output carries, on each output axis, the labels of its letter; two channel spaces on two output axes
  (an outer product) keep the larger and freeze the other, as element-wise outer products do.

Slicing positions of a letter in every operand keeps the equation valid, and a grown letter's new positions
meet zero-initialised positions of the operand they are contracted with (the ``mix``/``in`` sites), so growth
preserves the function as for a matrix product.

MACs (two operands; torch contracts them as one batched matrix product): the product of the sizes of every
letter that reaches the output or is contracted between the operands (a letter only one operand has and the
output lacks is summed before the product, at no MAC cost); with no contracted letter the product is an
element-wise multiplication (no MACs). Each size is a linear form in the group widths.

>>> import torch
>>> from fxadapt.ops import OPS
>>> OPS[torch.ops.aten.einsum.default].kind
'couples'
>>> parse("bhld,...hd->...lh", [4, 3])
(['b', 'h', 'l', 'd'], ['…0', 'h', 'd'], ['…0', 'l', 'h'])
"""

from __future__ import annotations

import numpy as np

from fxadapt.ir.channels import ParamRef, Track
from fxadapt.ops.core import Blocked, Call, Ctx, aten_ops, register
from fxadapt.ops.forms import CostView


def broadcast_track(term: str, rank: int | None, width: int) -> list[str]:
    """Letters of one term; ``...`` becomes ``width`` letters ``…k`` (``k`` counted from the right)."""
    head, dots, tail = term.partition("...")
    if not dots:
        return list(term)
    n = width if rank is None else rank - len(head) - len(tail)
    return list(head) + [f"…{k}" for k in reversed(range(n))] + list(tail)


def parse(eq: str, ranks: list[int]) -> tuple[list[str], ...]:
    """The letters of every operand and of the output (implicit output: the letters used once, sorted,
    after the ellipsis)."""
    lhs, arrow, rhs = eq.replace(" ", "").partition("->")
    terms = lhs.split(",")
    width = max([r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t] or [0])
    ins = [broadcast_track(t, r, width) for t, r in zip(terms, ranks)]
    if arrow:
        out = broadcast_track(rhs, None, width)
    else:
        flat = [c for term in ins for c in term]
        out = [f"…{k}" for k in reversed(range(width))] + sorted(c for c in set(flat)
                                                                   if flat.count(c) == 1 and c[0] != "…")
    return (*ins, out)


def _letters(call: Call, ctx: Ctx):
    """(operands, their letters, output letters, sizes per operand) or a reason."""
    ops = list(call.arg(1, "tensors"))
    shapes = [ctx.shape(x) for x in ops]
    if any(s is None for s in shapes):
        return "an operand of unknown shape"
    *ins, out = parse(call.arg(0, "equation"), [len(s) for s in shapes])
    if any(len(set(t)) != len(t) for t in ins):
        return "a letter repeated within one operand (a diagonal)"
    return ops, ins, out, shapes


def einsum(call: Call, ctx: Ctx):
    got = _letters(call, ctx)
    if isinstance(got, str):
        return Blocked(f"einsum {call.arg(0, 'equation')!r}: {got}")
    ops, ins, out, shapes = got
    if len(ops) > 2:
        return Blocked(f"einsum of {len(ops)} operands: the pairwise contraction order torch picks is not "
                       "modelled")
    labels: dict[str, np.ndarray] = {}
    for x, term in zip(ops, ins):
        t = ctx.track(x)
        if t is None:
            continue
        if len(t.axes) > 1:
            ctx.freeze(t, f"einsum operand {x.name} carries channels on several axes {t.axes}")
            continue
        c = term[t.axes[0]]
        if c in labels:
            ctx.couple(labels[c], t.labels)
        else:
            labels[c] = t.labels
    _fixed_operands(ctx, ops, ins, shapes, out, labels)
    for c in [c for c in labels if c not in out]:
        ctx.site("mix", labels[c], "mix")
    _new_spaces(ctx, ops, ins, shapes, out, labels)
    return _output(ctx, out, labels)


def _fixed_operands(ctx: Ctx, ops, ins, shapes, out, labels) -> None:
    """Operands holding a tracked letter untracked: a parameter is sliced along it, an activation freezes
    it."""
    for c in list(labels):
        for x, term, shape in zip(ops, ins, shapes):
            if c not in term or shape[term.index(c)] == 1:
                continue
            ax = term.index(c)
            t = ctx.track(x)
            if t is not None and t.axes == (ax,):
                continue
            if isinstance(x, ParamRef):
                ctx.param_site(x, ax, labels[c], "in" if c not in out else "const")
            else:
                ctx.freeze(labels[c],
                           f"einsum letter {c!r} pairs channels with {getattr(x, 'name', x)}, whose "
                                      f"axis {ax} has a fixed size {shape[ax]}")
                labels.pop(c)
                break


def _new_spaces(ctx: Ctx, ops, ins, shapes, out, labels) -> None:
    """An output letter only one parameter holds: that parameter's axis produces new channels."""
    for c in out:
        holders = [(x, term.index(c), shape) for x, term, shape in zip(ops, ins, shapes) if c in term]
        if c in labels or len(holders) != 1 or not isinstance(holders[0][0], ParamRef):
            continue
        ref, ax, shape = holders[0]
        labels[c] = ctx.new(shape[ax])
        ctx.param_site(ref, ax, labels[c], "out")


def _output(ctx: Ctx, out, labels):
    tracked = [(len(labels[c]), i, c) for i, c in enumerate(out) if c in labels]
    if not tracked:
        return None
    tracked.sort(reverse=True)
    _, axis, keep = tracked[0]
    for _, _, c in tracked[1:]:
        ctx.freeze(labels[c],
                   f"einsum output carries two channel spaces (letters {keep!r} and {c!r}): an outer "
                              f"product keeps the larger ({len(labels[keep])} channels)")
    return Track((axis,), labels[keep])


def einsum_macs(call: Call, cx: CostView):
    """Two operands: ``prod(size of every letter in the output or contracted between them)``; sizes of
    tracked letters (on an activation, or a sliced parameter axis) are linear forms in the group widths."""
    ops = list(call.arg(1, "tensors"))
    shapes = [cx.shape(x) for x in ops]
    if len(ops) != 2 or any(s is None for s in shapes):
        return None
    a, b, out = parse(call.arg(0, "equation"), [len(s) for s in shapes])
    if not [c for c in a if c in b and c not in out]:
        return None  # nothing contracted: an element-wise product, no MACs
    used = [c for c in dict.fromkeys(a + b) if c in out or (c in a and c in b)]
    return 1.0, [_letter_form(cx, ops, (a, b), shapes, c) for c in used]


def _letter_form(cx: CostView, ops, ins, shapes, c):
    size = max(s[t.index(c)] for t, s in zip(ins, shapes) if c in t)
    for x, term, shape in zip(ops, ins, shapes):
        if c not in term or shape[term.index(c)] != size:
            continue
        ax = term.index(c)
        form = cx.axis_form(cx.track(x), ax, size)
        if form is None and isinstance(x, ParamRef):
            lab = cx.sites.get((x.target, ax))
            form = cx.form(lab, size) if lab is not None else None
        if form is not None:
            return form
    return cx.const(size)


register(*aten_ops("einsum.default"), name="einsum", kind="couples", channels=einsum, cost=einsum_macs,
         zero="preserves")
