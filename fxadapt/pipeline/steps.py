"""The graph steps of ``fxadapt.transform``, from the captured graph to the verified one (``Job -> Job``).

    analyze        channel groups, blocks and the cost model of the captured graph; the budget resolved
                   against it (``Goal``: MACs, params, latency)
    plan           the strategy's ``Outcome`` (``STRATEGIES[cfg.strategy]``): the plan and the graph it
                   was made on
    materialize    every coupled group sliced or widened to the plan's widths (``passes.materialize``)
    rewire_blocks  residual blocks removed or repeated (``passes.rewire_blocks``)
    recalibrate_bn BatchNorm's running statistics re-estimated on the data (shrinking only: growth keeps
                   every statistic)
    fold_bn        BatchNorm folded into conv / linear, checked close to the graph before folding
    verify         the adapted graph runs; its output shapes equal the original's; its MACs counted
                   independently (``run_counted``) equal the cost model's prediction for the plan; the whole
                   ``Goal`` is met; a function-preserving plan's outputs are close to the original's

Growth under a norm that cannot preserve the function (``SolveConfig(preserve=False)``) is measured, not
assumed: its relative output error ``max |y - y0| / max |y0|`` over the floating outputs at the example
inputs is warned and kept in the outcome (``function_error``).

Example:
    >>> import torch
    >>> from fxadapt.analysis import analyze
    >>> from fxadapt.passes.capture import capture
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> a = analyze(capture(model, (torch.randn(1, 4),)))
    >>> resolve(0.5, a).macs == 0.5 * a.macs()
    True
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxadapt.analysis import Analysis, analyze
from fxadapt.analysis.count import run_counted
from fxadapt.analysis.hold import apply_hold
from fxadapt.checks import verify
from fxadapt.errors import BudgetError, GrowthWarning, warn
from fxadapt.passes.fold_bn import fold_bn as fold_bn_pass
from fxadapt.passes.materialize import materialize
from fxadapt.passes.rewire_blocks import rewire_blocks
from fxadapt.pipeline.config import hold_of
from fxadapt.pipeline.job import Job, module_result, original
from fxadapt.pipeline.strategies import STRATEGIES, Outcome
from fxadapt.planning.budget import Goal, parse_budget
from fxadapt.train.recalibrate import recalibrate_bn


def _attention(job: Job) -> str:
    """``"auto"`` is whole heads when the result goes back into the user's modules (an attention module has
    one ``head_dim`` for q, k and v, which per-piece head sizes would break); the analysis' own ``"auto"``
    (heads with rotary embeddings, else head_dim) for graph outputs."""
    return "heads" if job.cfg.attention == "auto" and module_result(job) else job.cfg.attention


def analyze_step(job: Job) -> Job:
    a = apply_hold(analyze(job.gm, attention=_attention(job)), hold_of(job.cfg))
    goal = resolve(job.budget, a)
    if not a.prunable:
        reasons = sorted({g.reason for g in a.groups if g.reason})
        raise BudgetError(f"{type(job.model).__name__} has no prunable channel group: "
                          + ("; ".join(reasons[:3]) if reasons
                             else "it has no conv, linear or embedding layer"))
    return dataclasses.replace(job, analysis=a, goal=goal)


def resolve(budget: Any, a: Analysis) -> Goal:
    """``budget`` against the analysed model (a ``BudgetError`` when it solves nothing)."""
    goal = parse_budget(budget, a.macs(), a.params())
    if goal.macs is None and goal.latency is None and goal.params is None:
        raise BudgetError("give macs=, params= or latency=")
    return goal


def plan_step(job: Job) -> Job:
    outcome = STRATEGIES[job.cfg.strategy](job)
    return dataclasses.replace(job, outcome=outcome, gm=outcome.base)


def materialize_step(job: Job) -> Job:
    return dataclasses.replace(job, gm=materialize(job.gm, job.outcome.plan).graph_module, planned=job.gm)


def rewire_step(job: Job) -> Job:
    return dataclasses.replace(job, gm=rewire_blocks(job.gm, job.outcome.plan).graph_module)


def with_data(job: Job) -> bool:
    return job.data is not None and job.cfg.recalibrate_bn > 0


def recalibrate_step(job: Job) -> Job:
    if job.goal.macs is not None and job.goal.macs >= job.analysis.macs():  # growth keeps every statistic
        return job
    gm = copy.deepcopy(job.gm)
    recalibrate_bn(gm, job.data, job.cfg.recalibrate_bn, job.cfg.search.batch_size)
    return dataclasses.replace(job, gm=gm)


def fold_asked(job: Job) -> bool:
    return job.cfg.fold_bn


def fold_step(job: Job) -> Job:
    if job.model.training if isinstance(job.model, nn.Module) else False:
        warn("fold_bn=True folds BatchNorm's running statistics (inference behaviour) of a model "
                      "given in train mode; the result is returned in eval mode")
    folded = fold_bn_pass(job.gm).graph_module
    verify.check_close(verify.outputs(job.gm, job.inputs), verify.outputs(folded, job.inputs), job.cfg,
                       "BatchNorm folding", (job.gm, lambda m: fold_bn_pass(m).graph_module), job.inputs)
    return dataclasses.replace(job, gm=folded.eval())


def verify_step(job: Job) -> Job:
    macs, got = run_counted(job.gm, job.inputs)
    if job.outcome.preserving or job.cfg.output_check:
        ref_model = original(job)
        reference = verify.outputs(ref_model, job.called)
    else:  # the original graph's recorded output shapes, as torch.export traced them
        reference = verify.recorded_outputs(job.analysis.gm)
    verify.check_shapes(reference, got)
    o = _growth_error(job, got)
    if o.preserving:
        verify.check_close(reference, got, job.cfg, "function-preserving growth / identity",
                           (ref_model, job.gm), job.inputs)
    predicted = o.analysis.cost.macs(o.plan.units, {b: 0.0 for b in o.plan.remove})
    verify.check_predicted(macs, predicted)
    verify.check_goal(job.goal, o, macs, job.analysis.macs(), job.gm, job.cfg.solve)
    return dataclasses.replace(job, macs=macs, outputs=got, reference=reference, outcome=o)


def _growth_error(job: Job, got) -> Outcome:
    """Non-preserving growth (``SolveConfig(preserve=False)``): the outcome with the output error against the
    original (max |difference| over max |original|, at the example inputs), warned."""
    grown = job.outcome.grown_under_norm
    if not grown:
        return job.outcome
    ref = [t for t in pytree.tree_leaves(verify.outputs(original(job), job.called))
           if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    err = max(float((o - r).abs().max() / r.abs().max().clamp_min(1e-12)) for o, r in zip(out, ref))
    warn("growth under a norm is not function-preserving (SolveConfig(preserve=False)): "
         f"{', '.join(grown[:3])}{' ...' if len(grown) > 3 else ''} widened; outputs differ from the "
         f"original by {err:.2e} (max |diff| / max |original| at the example inputs): fine-tune the result",
         GrowthWarning)
    return dataclasses.replace(job.outcome, function_error=err)
