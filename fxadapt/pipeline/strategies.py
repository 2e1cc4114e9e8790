"""Planning strategies: from an analysed model and a MAC target to a ``Plan`` (and the graph it applies to).

- ``datafree``: widths by one global scale (``fxadapt.planning.solver``), aligned (``halving``: the target's
  alignment, halved where it misses the window), L1-ranked channels; a params budget alone or with a MAC
  budget is ``fxadapt.pipeline.params``; with ``grow_depth`` a growth target first adds one zero-initialised
  copy of every repeatable block; a latency budget is solved on the target
  (``fxadapt.planning.latency.solve_latency``);
- ``dna``: differentiable width+depth search in the elastic supernet (``fxadapt.search.dna``);
- ``fur``: Network Adjustment (``fxadapt.search.fur``);
- ``importance``: data-scored units and blocks kept by importance per MAC under one price, pruned in steps
  with distillation from the original (``fxadapt.search.importance``); under a latency budget toward the
  MACs the data-free latency solve reaches, the last step re-timed and repaired on the target.

Each returns an ``Outcome``: the graph the plan applies to (the captured graph, or the supernet's with
its trained weights), the plan, the analysis the plan refers to, the search history, the block ids that
were inserted as depth slots, and whether the change preserves the function (pure growth / identity);
typed, what the report's first history entry says (``fxadapt.planning.outcome``: the alignment, the
``Binding`` constraint, the parameters a params solve reached, the ``Latency`` measured, the groups grown
under a norm). Construct it by keyword: ``Outcome(base=, plan=, analysis=, history=, ...)``.

>>> sorted(STRATEGIES)
['datafree', 'dna', 'fur', 'importance']
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import TYPE_CHECKING

from fxadapt import dist, meta
from fxadapt.analysis import analyze
from fxadapt.analysis.hold import apply_hold
from fxadapt.errors import (
    BudgetError,
    SearchInterrupted,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.hw.target import Target
from fxadapt.passes.materialize import apply_plan
from fxadapt.passes.rewire_blocks import repeat_blocker
from fxadapt.passes.shape_check import shape_check
from fxadapt.pipeline.params import params_only, with_params
from fxadapt.pipeline.stated import config_ties, statable
from fxadapt.planning.budget import BudgetWarning
from fxadapt.planning.latency import solve_latency
from fxadapt.planning.outcome import Binding, Latency, Outcome  # noqa: F401  (re-export)
from fxadapt.planning.plan import growth_blocker, make_plan
from fxadapt.planning.solver import SolveConfig, check_window, solve_widths
from fxadapt.planning.stated import stated_widths
from fxadapt.planning.uniform import Tying, uniform_widths
from fxadapt.search.dna import dna
from fxadapt.search.fur import fur
from fxadapt.search.importance import importance
from fxadapt.search.latency_loss import search_latency
from fxadapt.search.screen import screen

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis
    from fxadapt.pipeline.job import Job


def datafree(job: Job) -> Outcome:
    a, target, cfg = job.analysis, job.goal.macs, job.cfg
    if job.goal.latency is not None:
        return _latency(job)
    if target is None:
        return _params(job)
    a, slots = _deepened(a, target, cfg.solve.tol) if cfg.grow_depth and target > a.macs() \
            else (a, frozenset())
    hw = job.goal.target   # the hardware Target of a latency / target budget
    start = hw.align() if hw is not None and cfg.solve.align == "auto" else None
    if slots and a.macs() >= target:   # the copies alone land in the growth window: widths stay
        units, align, params = {}, 1, None
    else:
        units, align, params = _macs_solve(job, a, start)
    plan = make_plan(a, units, preserve=cfg.solve.preserve)
    mixed = tuple(g.name for g in a.groups if units.get(g.id, g.units) > g.units
                  and growth_blocker(a, g) is not None)
    preserving = all(units.get(g.id, g.units) >= g.units for g in a.groups) and not mixed
    return Outcome(a.gm, plan, a, (), slots, preserving, align=align, grown_under_norm=mixed,
                   binding=Binding.PARAMS if params is not None else None, params=params)


def _macs_solve(job: Job, a: Analysis, start: int | None) -> tuple[dict[int, int], int, float | None]:
    """The MAC solve, one attempt per alignment ``halving`` tries: the solver's widths, tied (uniform layers,
    write-back ties: ``_tied``), brought under a params budget too (``fxadapt.pipeline.params``). Returns
    the widths, the alignment and, where the parameters bind, the parameter count reached (else None)."""
    target = job.goal.macs

    def attempt(cfg):
        if job.goal.params is None:
            return _tied(job, a, solve_widths(a, target, cfg), target, cfg), None
        with warnings.catch_warnings():   # the MAC window matters only where the MACs bind: checked then
            warnings.simplefilter("ignore", BudgetWarning)
            n = _tied(job, a, solve_widths(a, target, cfg), target, cfg)
        n, params = with_params(job, a, n, cfg)
        if params is None:
            check_window(a, n, target, target > a.macs(), cfg)
        return n, params

    (units, params), align = halving(job.cfg.solve, start, attempt)
    return units, align, params


def _tied(job: Job, a: Analysis, units: dict[int, int], target: float, cfg: SolveConfig) -> dict[int, int]:
    """``units`` with repeated layers (``layers="uniform"``) and ``job.ties`` (``fxadapt.pipeline.replan``)
    at shared widths (``fxadapt.planning.uniform``)."""
    stock = job.cfg.layers == "uniform" and job.cfg.output == "module"   # sizes the model's config can state
    tying = Tying(job.cfg.layers == "uniform", job.ties + (config_ties(job.model, a) if stock else ()))
    units = uniform_widths(a, units, target, cfg, tying=tying) if tying.repeated or tying.ties else units
    st = statable(job.model, a) if stock else None
    return stated_widths(a, units, target, cfg, st, tying) if st is not None else units


def _params(job: Job) -> Outcome:
    """A params budget alone (``fxadapt.pipeline.params``), the plan on the analysis itself."""
    a, cfg = job.analysis, job.cfg
    units, align, params = params_only(job, lambda view, target, solve: halving(
        solve, None, lambda c: _tied(job, view, solve_widths(view, target, c), target, c)))
    plan = make_plan(a, units, preserve=cfg.solve.preserve)
    preserving = all(units.get(g.id, g.units) >= g.units for g in a.groups)
    return Outcome(a.gm, plan, a, (), frozenset(), preserving, align=align, params=params)


def _latency(job: Job) -> Outcome:
    """A latency budget on its target (see ``aligned_latency``)."""
    a = job.analysis
    sol, align = aligned_latency(a, job.goal, job.cfg.solve)
    return Outcome(a.gm, make_plan(a, sol.units), a, tuple(sol.history), align=align,
                   binding=Binding(sol.binding), latency=Latency(sol.latency, sol.budget, sol.base))


def aligned_latency(a: Analysis, goal, solve: SolveConfig, **kw):
    """``solve_latency`` at the target's alignment, halved (``"auto"``) where the budget or its measured
    window is out of reach (``halving``); ``kw`` go to ``solve_latency`` (a search's table, measurer and
    widths). Returns the solution and the alignment."""
    return halving(solve, (goal.target or Target()).align(),
                   lambda cfg: solve_latency(a, goal, cfg=cfg, **kw))


def halving(solve: SolveConfig, start: int | None, attempt):
    """``attempt(cfg)`` at ``solve.align``; with ``"auto"``, from ``start`` (default: this CPU's block)
    halving the alignment while the attempt raises ``BudgetError`` or warns ``BudgetWarning`` (budget or
    window out of reach), down to 1, whose outcome (warnings included) stands. Returns it and the alignment
    used."""
    if solve.align != "auto":
        return attempt(solve), solve.alignment()
    align = start or solve.alignment()
    while align > 1:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", BudgetWarning)
                return attempt(dataclasses.replace(solve, align=align)), align
        except (BudgetError, BudgetWarning):
            align //= 2
    return attempt(dataclasses.replace(solve, align=1)), 1


def _deepened(a: Analysis, target: float, tol: float):
    """The analysis of ``a``'s graph with one zero-initialised copy after every repeatable block (if that
    stays within the growth window ``[., (1 + tol) T]``), and the ids of the inserted blocks."""
    repeat = {b.id: 1 for b in a.blocks if b.repeatable and repeat_blocker(a.gm, b) is None}
    if not repeat:
        return a, frozenset()
    deep = apply_plan(a.gm, make_plan(a, {}, repeat=repeat)).graph_module
    shape_check(deep, a.gm.meta[meta.INPUTS])
    a2 = apply_hold(analyze(deep), a.hold)
    if a2.macs() > target * (1 + tol):      # beyond the growth window: the widths would have to shrink
        return a, frozenset()
    nodes = {n.name: n for n in a2.gm.graph.nodes}
    return a2, frozenset(b.id for b in a2.blocks if meta.REPEAT_OF in nodes[b.exit].meta)


def _searched(job: Job, run, scfg) -> Outcome:
    """``run`` (``dna`` or ``fur``) with ``scfg`` on the transform's device and precision (the one source:
    ``TransformConfig.device`` / ``.precision``)."""
    if job.goal.macs is None and job.goal.latency is None:
        raise BudgetError(f"strategy={job.cfg.strategy!r} searches for MAC or latency budgets: a params "
                          f"budget alone is solved data-free (strategy='datafree')")
    ctx = dist.setup(job.cfg.device, job.cfg.precision)
    if job.goal.latency is not None:
        return _latency_search(job, run, scfg, ctx)
    base, plan, sn, state = run(job.analysis, job.goal.macs, job.data, job.val_data, scfg, ctx)
    if base is None:
        raise SearchInterrupted(f"search stopped at step {state.step} of {scfg.steps}; "
                                f"checkpoint {scfg.checkpoint} resumes it")
    history = tuple(state.history if hasattr(state, "history") else state)
    slots = frozenset(b for b, on in sn.spec.depths.items() if not on)
    return Outcome(base, plan, sn.analysis, history, slots)


def _latency_search(job: Job, run, scfg, ctx) -> Outcome:
    """DNA with the expected latency in its loss (``fxadapt.search.latency_loss``), repaired on the target."""
    if run is not dna:
        raise BudgetError(f"strategy={job.cfg.strategy!r} searches for MAC budgets only: use strategy='dna' "
                          f"(the expected latency is part of its loss) or 'datafree' for Budget(latency=...)")
    found = search_latency(job.analysis, job.goal, job.data, job.val_data, scfg, ctx)
    sol, align = aligned_latency(found.sn.analysis, job.goal, job.cfg.solve, lut=found.lut,
                                 measure=found.measure, widths=found.units, progress=scfg.progress)
    base, plan = found.sn.finalize(sol.units, {b: 1.0 for b in found.sn.depth_gates()})
    return Outcome(base, plan, found.sn.analysis, (*found.state.history, *sol.history), align=align,
                   binding=Binding(sol.binding), latency=Latency(sol.latency, sol.budget, sol.base),
                   searched="dna, expected latency in the loss")


def search_solve(solve: SolveConfig) -> SolveConfig:
    """The searches rescale inside their supernet's bins: "auto" alignment becomes the CPU's block only
    when asked explicitly (the supernet's bins are not aligned), so "auto" means 1 there."""
    return dataclasses.replace(solve, align=1) if solve.align == "auto" else solve


def search_dna(job: Job) -> Outcome:
    return _searched(job, dna, dataclasses.replace(job.cfg.search, solve=search_solve(job.cfg.solve)))


def search_fur(job: Job) -> Outcome:
    return _searched(job, fur, dataclasses.replace(job.cfg.fur, solve=search_solve(job.cfg.solve)))


def search_importance(job: Job) -> Outcome:
    """Importance-driven pruning with distillation (``fxadapt.search.importance``); a MAC or a params budget
    (units priced by that count's marginals), shrinking. The last prune step is aligned like the data-free
    solve (``halving`` from the target's alignment)."""
    params = job.goal.params is not None and job.goal.macs is None and job.goal.latency is None
    latency = job.goal.latency is not None and job.goal.macs is None and job.goal.params is None
    if not (params or latency) and (job.goal.macs is None or job.goal.latency is not None
                                    or job.goal.params is not None):
        raise BudgetError("strategy='importance' takes a MAC, a params or a latency budget alone: use "
                          "strategy='datafree' for budgets together")
    hw, solve = job.goal.target, job.cfg.solve
    start = hw.align() if hw is not None and solve.align == "auto" else None
    cfg = dataclasses.replace(job.cfg.importance, solve=solve)
    if latency:
        return _importance_latency(job, cfg)
    run = screen if cfg.screen and not params else importance   # axis candidates ranked on validation
    if params:
        run = functools.partial(importance, metric="params")
    base, plan, sn, history = run(job.analysis, job.goal.params if params else job.goal.macs, job.data,
                                  job.val_data, cfg, dist.setup(job.cfg.device, job.cfg.precision),
                                  align=lambda attempt, *_: halving(solve, start, attempt))
    return Outcome(base, plan, sn.analysis, tuple(history), align=history[-1]["align"],
                   searched=history[-1]["searched"])


def _importance_latency(job: Job, cfg) -> Outcome:
    """Importance under a latency budget: the data-free measured latency solve says how many MACs the
    budget's speed allows (``M_L``); importance prunes toward ``M_L``; its last step's allocation is the
    reference of the measured latency solve on the supernet (the global scale of that allocation, re-timed
    interleaved with the original and repaired into ``[0.9 T, T]``, as after DNA's latency search), each
    group at most the units it still has, the units kept ranked by importance."""
    a, goal, solve = job.analysis, job.goal, job.cfg.solve
    free, _ = aligned_latency(a, goal, solve, progress=False)
    solved = []

    def align(attempt, sa, alive: dict[int, int]):
        with warnings.catch_warnings():     # the MAC window is only the reference's: latency binds
            warnings.simplefilter("ignore", BudgetWarning)
            ref = attempt(dataclasses.replace(solve, align=1))
        capped = dataclasses.replace(sa, groups=[
            dataclasses.replace(g, max_units=min(alive[g.id], g.max_units or g.units)) if g.id in alive else g
            for g in sa.groups])
        sol, step = aligned_latency(capped, goal, solve, widths=ref, progress=False)
        solved.append(sol)
        return {**alive, **sol.units}, step

    base, plan, sn, history = importance(a, a.cost.macs(free.units), job.data, job.val_data, cfg,
                                         dist.setup(job.cfg.device, job.cfg.precision), align=align)
    sol = solved[-1]
    return Outcome(base, plan, sn.analysis, (*history, *sol.history), align=history[-1]["align"],
                   binding=Binding(sol.binding), latency=Latency(sol.latency, sol.budget, sol.base),
                   searched=f"{history[-1]['searched']}, latency repaired on the target")


STRATEGIES = {"datafree": datafree, "dna": search_dna, "fur": search_fur, "importance": search_importance}
