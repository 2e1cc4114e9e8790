"""Planning strategies: from an analysed model and a MAC target to a ``Plan`` (and the graph it applies to).

- ``datafree``: widths by one global scale (``fxadapt.planning.solver``), L1-ranked channels; with
  ``grow_depth`` a growth target first adds one zero-initialised copy of every repeatable block;
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
from dataclasses import dataclass

from torch.fx import GraphModule

from fxadapt import meta
from fxadapt.analysis import analyze
from fxadapt.errors import FxAdaptError
from fxadapt.passes.materialize import apply_plan
from fxadapt.passes.rewire_blocks import repeat_blocker
from fxadapt.passes.shape_check import shape_check
from fxadapt.planning.plan import make_plan
from fxadapt.planning.solver import solve_widths
from fxadapt.search.dna import dna
from fxadapt.search.fur import fur


class SearchInterrupted(FxAdaptError):
    """A search stopped early on purpose (``SearchConfig.stop_after``); its checkpoint resumes it."""


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
    a, slots = _deepened(a, target) if cfg.grow_depth and target > a.macs() else (a, frozenset())
    units = solve_widths(a, target, cfg.solve)
    plan = make_plan(a, units)
    preserving = all(units.get(g.id, g.units) >= g.units for g in a.groups)
    return Outcome(a.gm, plan, a, (), slots, preserving)


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
    base, plan, sn, state = run(job.analysis, job.target.macs, job.data, job.val_data, scfg)
    if base is None:
        raise SearchInterrupted(f"search stopped at step {state.step} of {scfg.steps}; "
                                f"checkpoint {scfg.checkpoint} resumes it")
    history = tuple(state.history if hasattr(state, "history") else state)
    slots = frozenset(b for b, on in sn.spec.depths.items() if not on)
    return Outcome(base, plan, sn.analysis, history, slots)


def search_dna(job) -> Outcome:
    over = {"device": job.cfg.device} | ({"steps": job.cfg.steps} if job.cfg.steps is not None else {})
    return _searched(job, dna, dataclasses.replace(job.cfg.search, **over))


def search_fur(job) -> Outcome:
    return _searched(job, fur, dataclasses.replace(job.cfg.fur, device=job.cfg.device))


STRATEGIES = {"datafree": datafree, "dna": search_dna, "fur": search_fur}
