"""Re-planning when the write-back fails because the model's own code reads a size at run time.

A captured graph holds every size as a constant, while a model's code may compute one from another tensor
(SegFormer's sequence reduction: ``sr(x).reshape(b, x.shape[1], -1)``, then a LayerNorm). The graph then
sizes two groups independently: ``A``, the width the code reads (the conv's input), and ``B``, the width the
graph gives the next module (the conv's output). A plan with ``n_A != n_B`` verifies as a graph and fails in
the user's module; ``fxadapt.writeback.probe`` names the first module whose input differs from the graph's
(``Divergence``: its path, the shape it receives and the one the graph gives it). On an axis ``k`` where the
two differ:

    B = the group on axis k of that module's input in the planned graph (its channel labels there)
    A = a prunable group other than B whose planned width is the received size and whose original width is
        B's (the code read a size that equalled B's in the original), with the same units and granularity;
        of several, the one traced in the innermost module scope shared with the failing module, then the
        nearest before it in graph order

``{A, B}`` becomes a tie (``fxadapt.planning.uniform.Tying``: tied groups take one width), and the plan is
made again with every tie so far, materialised, verified and written back, at most ``RETRIES`` times (the
orchestrator's loop, ``fxadapt.pipeline.transform``; this module diagnoses: ``write_back_tie`` reads the
typed failure, ``SizeConflict.divergence``); each tie is reported in a ``ReplanWarning`` and in the report
(``Outcome.ties`` and ``notes``: history ``ties``, ``note``). Where the failing op is inside a module
(``read_size_tie``), the tie is in channels (a hidden width tied to whole heads) and holds in every module of
that class at once (``Ties``); two sizes the module compares that the plan made equal are kept apart
(``Apart``). Nothing is tied when
no such pair exists, the strategy is a search (its plan is not re-made), or the retries are spent: then the
verified graph of the first plan is returned, as before.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

from fxadapt import meta
from fxadapt.planning.uniform import Apart, Ties
from fxadapt.writeback.build import SizeConflict
from fxadapt.writeback.probe import Divergence, running_at_failure
from fxadapt.writeback.recipe import apply
from fxadapt.writeback.widths import module_stack

if TYPE_CHECKING:
    from torch.fx import GraphModule, Node

    from fxadapt.analysis.analyze import Analysis
    from fxadapt.pipeline.job import Job

RETRIES = 2


def write_back_tie(job: Job) -> tuple[frozenset[int], str] | None:
    """The tie for the job's failed write-back (``job.written``, a typed failure; module docstring) and why,
    or None."""
    failed = job.written.failure
    where = failed.divergence if isinstance(failed, SizeConflict) else None
    tie, why = find_tie(job, where), str(where)
    if tie is None:
        tie, why = read_size_tie(job, job.written.recipe)
    return (tie, f"{why}: the model's code reads that size at run time") if tie is not None else None


def tie_note(job: Job, tie: frozenset[int], why: str) -> str:
    """The sentence a tie is reported with (``ReplanWarning``, the report's ``note``)."""
    parts = tie.parts if isinstance(tie, Ties) else (tie,)
    names = [job.analysis.groups[g].name for g in sorted(parts[0])]
    how = "kept at different widths" if isinstance(tie, Apart) else "tied to one width"
    more = f", and likewise in {len(parts) - 1} more module(s) of that class" if len(parts) > 1 else ""
    return f"{', '.join(names[:-1])} and {names[-1]} {how}{more} ({why})"


def tie_names(job: Job) -> tuple[tuple[str, ...], ...]:
    """The job's ties as group names (the report's ``ties``; a ``Ties``' parts one by one)."""
    ties = [p for t in job.ties for p in (t.parts if isinstance(t, Ties) else (t,))]
    return tuple(tuple(sorted(job.analysis.groups[g].name for g in t)) for t in ties)


def find_tie(job: Job, where: Divergence | None) -> frozenset[int] | None:
    """``{A, B}`` for ``where`` (module docstring), or None."""
    if where is None or len(where.got) != len(where.want):
        return None
    a, plan = job.analysis, job.outcome.plan
    node = _entry(job.planned if job.planned is not None else a.gm, where.path)
    if node is None:
        return None
    for k, (got, want) in enumerate(zip(where.got, where.want)):
        for b in (_axis_groups(a, node, k) if got != want else ()):
            g = a.groups[b]
            cands = [c for c in a.prunable if c.id != b and c.width == g.width and c.units == g.units
                     and c.granularity == g.granularity
                     and plan.units.get(c.id, c.units) * c.granularity == got]
            if cands:
                return frozenset({b, _nearest(a.gm, cands, where.path, node).id})
    return None


def read_size_tie(job: Job, recipe) -> tuple[frozenset[int] | None, str]:
    """Where no module receives a shape the graph does not give it (the failing op is inside a module, e.g. a
    reshape by a size read from the module's input): the plan's sizes replayed on a copy of the model
    (``recipe``), and for the modules running when it fails, innermost first, ``A`` = a group on that
    module's input and ``B`` = a group with a size argument (a reshape's constant) inside it, of the same
    original channel width (its units may be whole heads where ``A`` counts channels: the tie is in
    channels, ``fxadapt.planning.uniform``), planned wider or narrower than ``A`` (``A`` may be frozen: ``B``
    then keeps ``A``'s width). Where none is, ``A`` and ``B`` of different original widths that the module
    holds as two size attributes and the plan made equal (its code compares them): an ``Apart`` pair that
    keeps them different. ``(tie, where)`` or ``(None, "")``."""
    try:
        work = apply(recipe, copy.deepcopy(job.model))
        with torch.no_grad():
            for t in [*work.parameters(), *work.buffers()]:
                t.zero_()
        running = running_at_failure(work, lambda: job.called.call(work)) or []
    except Exception:  # noqa: BLE001 - a recipe that does not replay: nothing to learn from it
        return None, ""
    a, plan, gm = job.analysis, job.outcome.plan, job.planned if job.planned is not None else job.analysis.gm
    width = lambda g: plan.units.get(g.id, g.units) * g.granularity  # noqa: E731
    for path, mod, _ in reversed(running):
        entry = _entry(gm, path, inner=True) if path else None
        ins = [a.groups[g] for g in (entry.meta.get(meta.GROUP, ()) if entry is not None else ())]
        sized = _sized_inside(a, gm, path)
        for g in ins:
            same = [b for b in sized if g.id != b.id and g.width == b.width]
            if any(width(g) != width(b) for b in same):   # every size read from g's width, all at once
                tie = _in_every(job, gm, path, frozenset({g.id, *(b.id for b in same)}))
                return tie, f"{path} ({type(mod).__name__}) fails inside"
        pair = _apart(job, path, ins, sized, width)
        if pair is not None:
            return pair, f"{path} ({type(mod).__name__}) compares its sizes"
    return None, ""


def _in_every(job: Job, gm: GraphModule, path: str, tie: frozenset[int]) -> frozenset[int]:
    """``tie`` and the same rule in every other module of the class of the module at ``path`` (its code
    reads its sizes the same way): per module, a group on its input with the groups sized inside it of the
    same original channel width; a ``Ties`` of them all where there are more than ``tie``."""
    a, kind = job.analysis, type(job.model.get_submodule(path))
    parts = [tie]
    for q, m in job.model.named_modules():
        if q == path or type(m) is not kind:
            continue
        entry = _entry(gm, q, inner=True)
        sized = _sized_inside(a, gm, q)
        for g in (a.groups[i] for i in (entry.meta.get(meta.GROUP, ()) if entry is not None else ())):
            same = [b.id for b in sized if g.id != b.id and g.width == b.width]
            if same and (g.prunable or any(a.groups[b].prunable for b in same)):
                parts.append(frozenset({g.id, *same}))
    return Ties(parts) if len(parts) > 1 else tie


def _apart(job: Job, path: str, ins: list, sized: list, width) -> Apart | None:
    """``{A, B}`` of different original widths, both held by the original module at ``path`` as integer
    attributes, that the plan made equal (``read_size_tie``), or None."""
    try:
        held = {v for v in vars(job.model.get_submodule(path)).values() if type(v) is int}
    except AttributeError:
        return None
    for g in ins:
        for b in sized:
            if g.width != b.width and {g.width, b.width} <= held and width(g) == width(b) \
                    and (g.prunable or b.prunable):
                return Apart({g.id, b.id})
    return None


def _sized_inside(a: Analysis, gm: GraphModule, path: str) -> list:
    """Groups with a size-argument site (a reshape's constant, a split's piece sizes) on a node traced inside
    module ``path``."""
    inside = {n.name for n in gm.graph.nodes if path in module_stack(n)}
    return [g for g in a.groups
            if any(m.kind in ("shape_arg", "split") and m.site.node_name in inside for m in g.members)]


def _entry(gm: GraphModule, path: str, inner: bool = False):
    """The first tensor operand from outside module ``path`` of the first node traced in it (``inner``: or in
    a module inside it)."""
    for node in gm.graph.nodes:
        stack = module_stack(node)
        here = path in stack if inner else bool(stack) and stack[-1] == path
        if not here or node.op not in ("call_function", "call_module"):
            continue
        outside = [x for x in node.all_input_nodes if x.op != "get_attr" and path not in module_stack(x)]
        return next((x for x in outside if hasattr(x.meta.get("val"), "shape")), None)
    return None


def _axis_groups(a: Analysis, node: Node, k: int) -> list[int]:
    """The groups whose channel labels lie on axis ``k`` of ``node``'s output."""
    track = node.meta.get(meta.TRACK)
    if track is None or not hasattr(track, "axes") or k not in track.axes:
        return []
    labels = np.moveaxis(np.asarray(track.labels), track.axes.index(k), 0).reshape(-1)
    ids = np.unique(a.group_of[a.roots[labels[labels >= 0]]])
    return [int(i) for i in ids if i >= 0]


def _nearest(gm: GraphModule, cands: list, path: str, node: Node):
    """Of ``cands``, the group traced in the innermost module scope shared with ``path``, then the one whose
    last node before ``node`` is nearest to it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    parts = path.split(".")

    def score(c):
        best = (-1, -1)
        for n in gm.graph.nodes:
            if c.id in n.meta.get(meta.GROUP, ()) and order[n] <= order[node]:
                stack = module_stack(n)
                inner = stack[-1].split(".") if stack else []
                shared = next((i for i, (x, y) in enumerate(zip(parts, inner)) if x != y),
                              min(len(parts), len(inner)))
                best = max(best, (shared, order[n]))
        return best

    return max(cands, key=score)
