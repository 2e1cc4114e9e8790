"""``fxadapt.transform(model, [b_1, b_2, ...], ...)``: one model per budget from one capture, one analysis
and, for DNA, one search.

``capture`` and ``analyze`` run once; every budget is resolved against that analysis; ``plan`` runs once
for all of them: DNA trains one supernet and derives every MAC budget from it
(``fxadapt.search.many.dna_many``: shared training at the geometric mean budget, then a short gate-only
search per budget; a latency budget in the list gets its own search with the expected latency in its
loss), while the data-free solver (MAC and latency budgets mixed) and FUR plan each budget on the shared
analysis. Then every budget runs the remaining steps on its own (materialize, rewire_blocks,
recalibrate_bn, fold_bn, verify, write_back, ...), so each result is verified exactly as a single
``transform``'s, with its own ``fxadapt.report``. The results come back as a list in the budgets' order.
This module plans the budgets (``outcomes``); ``fxadapt.pipeline.transform.transform_many`` runs the steps.

>>> import torch, fxadapt
>>> from fxadapt.examples import example_model, EXAMPLE_INPUT_SHAPE
>>> x = torch.randn(EXAMPLE_INPUT_SHAPE)
>>> models = fxadapt.transform(example_model(), [0.25, 0.5], (x,))
>>> [round(fxadapt.report(m).macs_after / fxadapt.report(m).macs_before, 2) for m in models]
[0.25, 0.5]
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from fxadapt import dist
from fxadapt.pipeline.strategies import STRATEGIES, Outcome, search_solve
from fxadapt.planning.budget import Goal
from fxadapt.search.many import dna_many

if TYPE_CHECKING:
    from fxadapt.pipeline.job import Job


def outcomes(job: Job, budgets: list[Any], goals: list[Goal]) -> list[Outcome]:
    """One plan per budget: one DNA search for all pure MAC budgets (a latency budget gets its own search,
    the expected latency in its loss), else the strategy per budget."""
    shared = [i for i, g in enumerate(goals) if g.latency is None and g.macs is not None]
    if job.cfg.strategy != "dna" or len(shared) < 2:
        return [STRATEGIES[job.cfg.strategy](dataclasses.replace(job, budget=b, goal=g))
                for b, g in zip(budgets, goals)]
    out = dict(zip(shared, _shared_dna(job, [goals[i] for i in shared])))
    for i, (b, g) in enumerate(zip(budgets, goals)):
        if i not in out:
            out[i] = STRATEGIES["dna"](dataclasses.replace(job, budget=b, goal=g))
    return [out[i] for i in range(len(goals))]


def _shared_dna(job: Job, goals: list[Goal]) -> list[Outcome]:
    """The MAC budgets' plans from one supernet (``fxadapt.search.many.dna_many``)."""
    scfg = dataclasses.replace(job.cfg.search, solve=search_solve(job.cfg.solve))
    ctx = dist.setup(job.cfg.device, job.cfg.precision)
    t0 = time.perf_counter()
    runs = dna_many(job.analysis, [g.macs for g in goals], job.data, job.val_data, scfg, ctx)
    seconds = time.perf_counter() - t0
    out = []
    for base, plan, sn, history in runs:
        slots = frozenset(b for b, on in sn.spec.depths.items() if not on)
        out.append(Outcome(base=base, plan=plan, analysis=sn.analysis,
                           history=tuple(history) + ({"search_s": seconds},), slots=slots))
    return out
