"""Planning strategies: from an analysed model and a MAC target to a ``Plan`` (and the graph it applies to).

- ``datafree``: widths by one global scale (``fxadapt.planning.solver``), aligned (``aligned_solve``),
  L1-ranked channels; with ``grow_depth`` a growth target first adds one zero-initialised copy of every
  repeatable block; a latency budget is solved on the target (``fxadapt.hw.latency.solve_latency``);
- ``dna``: differentiable width+depth search in the elastic supernet (``fxadapt.search.dna``);
- ``fur``: Network Adjustment (``fxadapt.search.fur``).

Each returns an ``Outcome``: the graph the plan applies to (the captured graph, or the supernet's with
its trained weights), the plan, the analysis the plan refers to, the search history, the block ids that
were inserted as depth slots, and whether the change preserves the function (pure growth / identity).

>>> sorted(STRATEGIES)
['datafree', 'dna', 'fur']
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from torch.fx import GraphModule

from fxadapt import meta
from fxadapt.analysis import analyze
from fxadapt.errors import (
    BudgetError,
    SearchInterrupted,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.passes.materialize import apply_plan
from fxadapt.passes.rewire_blocks import repeat_blocker
from fxadapt.passes.shape_check import shape_check
from fxadapt.planning.budget import BudgetWarning
from fxadapt.planning.plan import make_plan
from fxadapt.planning.solver import SolveConfig, solve_widths
from fxadapt.planning.uniform import uniform_widths
from fxadapt.search.dna import dna
from fxadapt.search.fur import fur


@dataclass(frozen=True)
class Outcome:
    base: GraphModule
    plan: object
    analysis: object
    history: tuple = ()
    slots: frozenset = frozenset()
    preserving: bool = False


def datafree(job) -> Outcome:
    a, target, cfg = job.analysis, job.target.macs, job.cfg
    if job.target.latency is not None:
        return _latency(job)
    a, slots = _deepened(a, target) if cfg.grow_depth and target > a.macs() else (a, frozenset())
    start = job.target.target.align() if job.target.target is not None and cfg.solve.align == "auto" else None
    if cfg.layers == "uniform":
        units, align = _uniform_solve(a, target, cfg.solve, start)
    else:
        units, align = aligned_solve(a, target, cfg.solve, start)
    plan = make_plan(a, units)
    preserving = all(units.get(g.id, g.units) >= g.units for g in a.groups)
    return Outcome(a.gm, plan, a, ({"align": align},), slots, preserving)


def _latency(job) -> Outcome:
    """A latency budget on its target; with ``"auto"`` alignment, the target's block or, where that cannot
    reach the budget, the largest power-of-two fraction of it that can."""
    from fxadapt.hw.latency import solve_latency
    from fxadapt.hw.target import Target

    a, solve = job.analysis, job.cfg.solve
    align = (job.target.target or Target()).align() if solve.align == "auto" else solve.alignment()
    while True:
        try:
            sol = solve_latency(a, job.target, cfg=dataclasses.replace(solve, align=align))
            head = {"align": align, "latency_s": sol.latency, "latency_budget_s": sol.budget,
                    "latency_base_s": sol.base, "binding": sol.binding}
            return Outcome(a.gm, make_plan(a, sol.units), a, (head, *sol.history))
        except BudgetError:
            if solve.align != "auto" or align == 1:
                raise
            align //= 2


def aligned_solve(a, target: float, solve: SolveConfig, start: int | None = None) -> tuple[dict[int, int], int]:
    """``solve_widths`` at ``solve.align``; with ``"auto"``, the target's alignment (the NCHWc block of this
    CPU) or, where that makes the ``tol`` window unreachable, the largest power-of-two fraction of it that
    does not (1 at worst): aligned widths when the model allows them, the budget first. ``start``: the
    budget's target's alignment (8 for CUDA) instead of this CPU's. Returns the widths and the alignment used."""
    if solve.align != "auto":
        return solve_widths(a, target, solve), solve.alignment()
    align = start or solve.alignment()
    while align > 1:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", BudgetWarning)
                return solve_widths(a, target, dataclasses.replace(solve, align=align, strict=True)), align
        except (BudgetError, BudgetWarning):
            align //= 2
    return solve_widths(a, target, dataclasses.replace(solve, align=1)), 1


def _uniform_solve(a, target: float, solve: SolveConfig, start: int | None) -> tuple[dict[int, int], int]:
    """Widths shared by repeated layers (``fxadapt.planning.uniform``); with ``"auto"`` alignment, halved
    until the shared widths reach the window (tied classes move in coarser steps than single groups)."""
    units, align = aligned_solve(a, target, solve, start)
    if solve.align != "auto":
        return uniform_widths(a, units, target, dataclasses.replace(solve, align=align)), align
    while align >= 1:
        step = dataclasses.replace(solve, align=align, strict=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", BudgetWarning)
                return uniform_widths(a, solve_widths(a, target, dataclasses.replace(step, strict=False))
                                      if align > 1 else units, target, step), align
        except (BudgetError, BudgetWarning):
            if align == 1:
                break
            align //= 2
    return uniform_widths(a, solve_widths(a, target, dataclasses.replace(solve, align=1)), target,
                          dataclasses.replace(solve, align=1)), 1


def _deepened(a, target: float):
    """The analysis of ``a``'s graph with one zero-initialised copy after every repeatable block (if that
    stays within the target), and the ids of the inserted blocks."""
    repeat = {b.id: 1 for b in a.blocks if b.repeatable and repeat_blocker(a.gm, b) is None}
    if not repeat:
        return a, frozenset()
    deep = apply_plan(a.gm, make_plan(a, {}, repeat=repeat)).graph_module
    shape_check(deep, a.gm.meta[meta.INPUTS])
    a2 = analyze(deep)
    if a2.macs() > target:
        return a, frozenset()
    nodes = {n.name: n for n in a2.gm.graph.nodes}
    return a2, frozenset(b.id for b in a2.blocks if meta.REPEAT_OF in nodes[b.exit].meta)


def _searched(job, run, scfg) -> Outcome:
    if job.target.macs is None:
        raise BudgetError(f"strategy={job.cfg.strategy!r} searches for a MAC budget and cannot take a latency-only "
                          f"budget yet: use strategy='datafree' for Budget(latency=...), or give the search macs=")
    base, plan, sn, state = run(job.analysis, job.target.macs, job.data, job.val_data, scfg)
    if base is None:
        raise SearchInterrupted(f"search stopped at step {state.step} of {scfg.steps}; "
                                f"checkpoint {scfg.checkpoint} resumes it")
    history = tuple(state.history if hasattr(state, "history") else state)
    slots = frozenset(b for b, on in sn.spec.depths.items() if not on)
    return Outcome(base, plan, sn.analysis, history, slots)


def _search_solve(solve: SolveConfig) -> SolveConfig:
    """The searches rescale inside their supernet's bins: "auto" alignment becomes the CPU's block only
    when asked explicitly (the supernet's bins are not aligned), so "auto" means 1 there."""
    return dataclasses.replace(solve, align=1) if solve.align == "auto" else solve


def search_dna(job) -> Outcome:
    c = job.cfg
    over = {"device": c.device, "precision": c.precision, "solve": _search_solve(c.solve)}
    over |= {"steps": c.steps} if c.steps is not None else {}
    return _searched(job, dna, dataclasses.replace(c.search, **over))


def search_fur(job) -> Outcome:
    c = job.cfg
    return _searched(job, fur, dataclasses.replace(c.fur, device=c.device, precision=c.precision,
                                                   solve=_search_solve(c.solve)))


STRATEGIES = {"datafree": datafree, "dna": search_dna, "fur": search_fur}
