"""``fxadapt.transform``: adapt a model to a budget, end to end, as a flat list of named passes.

The pipeline, as ``PIPELINE`` reads (``fxadapt.pipeline.runner`` lints and shape-checks after each step):

    capture        model (or ExportedProgram) -> trainable ATen-level GraphModule     fxadapt.ir.capture
    analyze        channel groups, blocks, cost model (cross-checked); budget parsed   fxadapt.analysis
    plan           strategy: datafree solve, or a search on data -> Plan   fxadapt.pipeline.strategies
    materialize    slice / widen every site                               passes.materialize
    rewire_blocks  remove / repeat residual blocks                        passes.rewire_blocks
    recalibrate_bn re-estimate BatchNorm statistics (data, shrinking)     fxadapt.train.recalibrate
    recover        the rest of recovery=W weight steps, distilled from    fxadapt.pipeline.recovery
                   the original (only with data and recovery=)
    fold_bn        fold BatchNorm into conv/linear (only with fold_bn)    passes.fold_bn
    verify         runs, shapes, MACs by an independent count, the whole Goal (MACs,  fxadapt.checks.verify
                   params, latency against the solver's measurement), function
                   preservation
    write_back     the plan in a deep copy of the user's own modules, checked against   fxadapt.writeback
                   the graph (only with output="module", the default); a model with a
                   cache is run with it too (fxadapt.pipeline.cache_check)
    dynamic_graph  graph outputs: that model re-captured with free sequence / image axes, kept if it
                   matches the verified graph
    export         hand back a torch.export.ExportedProgram (only with output="exported_program")

The orchestrator owns the retries: ``run_steps(PIPELINE, job, then=RETRIES)`` runs ``_retried`` after
``write_back``: while the write-back fails (a typed failure: ``SizeConflict`` with its ``Divergence``, ...)
or the cached path fails (``CacheFailure``) and ``replan`` / ``cache_check`` diagnose a tie from that data,
the ``REPLAN`` steps (``Step`` objects: plan to verify) run again with the tie, then ``write_back``. Steps
are pure ``Job -> Job`` and never run other steps.

The returned model keeps BatchNorm by default (it fine-tunes well); ``export_onnx`` folds it for
deployment, or pass ``fold_bn=True``.

Example:
    >>> import torch, fxadapt
    >>> from fxadapt.examples import example_model, EXAMPLE_INPUT_SHAPE
    >>> x = torch.randn(EXAMPLE_INPUT_SHAPE)
    >>> small = fxadapt.transform(example_model(), 0.5, (x,))
    >>> r = fxadapt.report(small)
    >>> 0.49 <= r.macs_after / r.macs_before <= 0.5, [name for name, _ in r.timings][:3]
    (True, ['capture', 'analyze', 'plan'])
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxadapt import meta
from fxadapt.analysis import Analysis, analyze
from fxadapt.analysis.count import run_counted
from fxadapt.analysis.hold import apply_hold
from fxadapt.checks import verify
from fxadapt.checks.verify import VerificationError  # noqa: F401  (re-export)
from fxadapt.errors import (
    BudgetError,
    FxAdaptError,
    GrowthWarning,
    InputError,
    ReplanWarning,
    WriteBackError,
    WriteBackWarning,
    warn,
)
from fxadapt.ir.capture import as_called
from fxadapt.ir.inputs import Inputs, as_inputs
from fxadapt.passes.capture import capture
from fxadapt.passes.fold_bn import fold_bn as fold_bn_pass
from fxadapt.passes.materialize import materialize
from fxadapt.passes.rewire_blocks import rewire_blocks
from fxadapt.pipeline import cache_check, many, replan
from fxadapt.pipeline.cache_check import CacheFailure, cached_failure
from fxadapt.pipeline.config import TransformConfig, checked_data, hold_of, transform_config
from fxadapt.pipeline.eager_check import warn_eager_gap
from fxadapt.pipeline.program import captured_from_program, to_exported_program
from fxadapt.pipeline.recovery import recover, recovering
from fxadapt.pipeline.report import Report, attach
from fxadapt.pipeline.runner import Step, run_steps
from fxadapt.pipeline.strategies import STRATEGIES, Outcome, SearchInterrupted  # noqa: F401  (re-export)
from fxadapt.planning.budget import Goal, parse_budget
from fxadapt.search.dna import SearchConfig  # noqa: F401  (re-export)
from fxadapt.train.recalibrate import recalibrate_bn
from fxadapt.writeback.build import Reference, WriteBack, write_back


@dataclass(frozen=True)
class Job:
    """What the pipeline steps read and produce (each step returns a new ``Job``)."""

    model: nn.Module | ExportedProgram
    example_inputs: Any             # as the user gave them (a tensor, tuple, dict, ``Inputs``)
    budget: Any                     # as the user gave it (a fraction, "200M", a ``Budget``)
    cfg: TransformConfig
    data: Any = None
    val_data: Any = None
    inputs: Inputs | None = None    # the example inputs as the graph is called with them (set by capture)
    called: Inputs | None = None    # ... and as the user's model is called to compute the same (capture)
    gm: GraphModule | None = None
    planned: GraphModule | None = None          # the graph the plan was materialised from
    analysis: Analysis | None = None
    goal: Goal | None = None        # the budget resolved against the model: MACs, params, latency, target
    outcome: Outcome | None = None
    macs: float = 0.0
    outputs: Any = None            # the adapted graph's outputs at the example inputs (verify ran it)
    reference: Any = None          # what verify compared them with (the original's outputs or shapes)
    result: nn.Module | GraphModule | ExportedProgram | None = None
    written: WriteBack | None = None       # the write-back: the module, or a typed failure (write_back)
    cached: CacheFailure | None = None     # how the written-back module's cached path fails (write_back)
    ties: tuple[frozenset[int], ...] = ()   # groups the plan gives one width (``fxadapt.pipeline.replan``)
    recovered: dict | None = None   # what the recovery did (``fxadapt.pipeline.recovery``; the report's)
    timings: tuple[tuple[str, float], ...] = ()


def _capture(job: Job) -> Job:
    if isinstance(job.model, ExportedProgram):

        gm = captured_from_program(job.model, job.example_inputs)
        gm.meta.setdefault(meta.INPUTS, as_inputs(job.example_inputs))
    else:
        with warnings.catch_warnings():
            if _module_result(job):   # the graph drops the KV cache; the model handed back keeps it
                warnings.filterwarnings("ignore", message=r"fxadapt\.capture: calling .* use_cache=False")
            gm = capture(job.model, job.example_inputs, dynamic=_capture_mode(job))
    inputs = gm.meta[meta.INPUTS]
    return dataclasses.replace(job, gm=gm, inputs=inputs, called=as_called(_original(job), inputs))


def _original(job: Job) -> nn.Module:
    """The user's model as a module (an ExportedProgram's ``module()``)."""
    return job.model.module() if isinstance(job.model, ExportedProgram) else job.model


def _attention(job: Job) -> str:
    """``"auto"`` is whole heads when the result goes back into the user's modules (an attention module has
    one ``head_dim`` for q, k and v, which per-piece head sizes would break); the analysis' own ``"auto"``
    (heads with rotary embeddings, else head_dim) for graph outputs."""
    return "heads" if job.cfg.attention == "auto" and _module_result(job) else job.cfg.attention


def _analyze(job: Job) -> Job:
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


def _plan(job: Job) -> Job:
    outcome = STRATEGIES[job.cfg.strategy](job)
    return dataclasses.replace(job, outcome=outcome, gm=outcome.base)


def _materialize(job: Job) -> Job:
    return dataclasses.replace(job, gm=materialize(job.gm, job.outcome.plan).graph_module, planned=job.gm)


def _rewire(job: Job) -> Job:
    return dataclasses.replace(job, gm=rewire_blocks(job.gm, job.outcome.plan).graph_module)


def _with_data(job: Job) -> bool:
    return job.data is not None and job.cfg.recalibrate_bn > 0


def _recalibrate(job: Job) -> Job:
    if job.goal.macs is not None and job.goal.macs >= job.analysis.macs():  # growth keeps every statistic
        return job
    gm = _copy(job.gm)
    recalibrate_bn(gm, job.data, job.cfg.recalibrate_bn, job.cfg.search.batch_size)
    return dataclasses.replace(job, gm=gm)


def _fold(job: Job) -> Job:
    if job.model.training if isinstance(job.model, nn.Module) else False:
        warn("fold_bn=True folds BatchNorm's running statistics (inference behaviour) of a model "
                      "given in train mode; the result is returned in eval mode")
    folded = fold_bn_pass(job.gm).graph_module
    verify.check_close(verify.outputs(job.gm, job.inputs), verify.outputs(folded, job.inputs), job.cfg,
                       "BatchNorm folding", (job.gm, lambda m: fold_bn_pass(m).graph_module), job.inputs)
    return dataclasses.replace(job, gm=folded.eval())


def _verify(job: Job) -> Job:
    macs, got = run_counted(job.gm, job.inputs)
    if job.outcome.preserving or job.cfg.output_check:
        ref_model = _original(job)
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
    ref = [t for t in pytree.tree_leaves(verify.outputs(_original(job), job.called))
           if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    err = max(float((o - r).abs().max() / r.abs().max().clamp_min(1e-12)) for o, r in zip(out, ref))
    warn("growth under a norm is not function-preserving (SolveConfig(preserve=False)): "
         f"{', '.join(grown[:3])}{' ...' if len(grown) > 3 else ''} widened; outputs differ from the "
         f"original by {err:.2e} (max |diff| / max |original| at the example inputs): fine-tune the result",
         GrowthWarning)
    return dataclasses.replace(job.outcome, function_error=err)


def _write_back(job: Job) -> Job:
    """The plan in a deep copy of the user's own modules, checked against the verified graph (``written``:
    the module, or a typed failure); a written-back model with a cache is run once with it too (``cached``:
    ``fxadapt.pipeline.cache_check``). What follows a failure is the orchestrator's (``_retried``)."""
    wb = written(job)
    if wb.module is None:
        return dataclasses.replace(job, written=wb, cached=None, result=None)
    job = module_job(dataclasses.replace(job, written=wb), wb)
    return dataclasses.replace(job, cached=cached_failure(job.result, job))


def written(job: Job) -> WriteBack:
    """``write_back`` of the job's plan into a deep copy of its model."""
    cfg = job.cfg
    ref = Reference(job.gm, job.planned, job.macs, job.outcome.preserving, cfg.rtol, cfg.atol, job.outputs,
                    job.reference)
    return write_back(job.model, job.outcome.plan, job.inputs, ref)


def module_job(job: Job, wb: WriteBack) -> Job:
    """The job with the written-back module as its result (its recipe attached)."""
    object.__setattr__(wb.module, "fxadapt_recipe", wb.recipe)
    return dataclasses.replace(job, result=wb.module)


def _retried(job: Job) -> Job:
    """The orchestrator's loop after ``write_back``: diagnose → re-plan → write back, over ``Step`` objects.

    While the write-back fails (a typed failure) and ``replan`` finds a tie in it, the plan is made again
    with the tie (``REPLAN``, then ``write_back``), at most ``replan.RETRIES`` times; when none helps the
    verified graph of the first plan comes back with a ``WriteBackWarning`` (``write_back="strict"``: a
    ``WriteBackError``). Then, while the written-back model's cached path fails and ``cache_check`` finds a
    tie in that failure, the same, at most ``cache_check.RETRIES`` times; when none helps the first
    written-back model comes back with a ``WriteBackWarning``. Searches are not re-planned."""
    datafree = job.cfg.strategy == "datafree"
    first, tries = job, 0
    while job.written.failure is not None:
        found = replan.write_back_tie(job) if datafree and tries < replan.RETRIES else None
        again = _replanned(job, *found) if found is not None and found[0] not in job.ties else None
        if again is None:
            return _graph_fallback(first)
        job, tries = again, tries + 1
    first, tries, failed = job, 0, job.cached
    while failed is not None and datafree and tries < cache_check.RETRIES:
        tie = cache_check.cache_tie(job, failed)
        if tie is None or tie in job.ties:
            break
        again = _replanned(job, tie, f"the cached path fails: {failed}; the model's cache reads that size")
        if again is None or again.written.failure is not None or not cache_check.one_width(again, tie):
            failed = dataclasses.replace(failed,
                                         message=f"{failed}; re-planning with those widths tied did not "
                                                         f"give them one width")
            break
        job, tries, failed = again, tries + 1, again.cached
    if failed is None:
        return job
    msg = (f"{type(first.model).__name__}: the written-back model's cached path (use_cache=True, what "
           f"generate runs) fails: {failed}; generate / use_cache=True will not work on the returned model "
           f"(call it with use_cache=False)")
    if first.cfg.write_back == "strict":
        raise WriteBackError(msg)
    warn(msg, WriteBackWarning)
    return dataclasses.replace(first, cached=None)


def _replanned(job: Job, tie: frozenset[int], why: str) -> Job | None:
    """``job`` re-planned with ``tie`` added to its ties (``REPLAN`` from the captured graph, the ties and
    notes in its outcome), then written back; the tie warned as a ``ReplanWarning``; None when the
    re-planning fails."""
    note = replan.tie_note(job, tie, why)
    warn(f"{type(job.model).__name__}: re-planned with {note}", ReplanWarning)
    notes = (*job.outcome.notes, note)
    start = dataclasses.replace(job, ties=(*job.ties, tie), gm=job.analysis.gm, result=None, written=None,
                                cached=None)
    try:
        job = run_steps(REPLAN, start)
    except FxAdaptError:
        return None
    job = dataclasses.replace(job, outcome=dataclasses.replace(job.outcome, ties=replan.tie_names(job),
                                                               notes=notes))
    return run_steps((WRITE_BACK,), job)


def _graph_fallback(job: Job) -> Job:
    """The verified graph as the result, where the plan could not be written back (``job.written``)."""
    reason = job.written.reason
    msg = (f"{type(job.model).__name__}: the adapted sizes could not be written back into its own modules "
           f"({reason}); returning the verified graph (a torch.fx.GraphModule) instead")
    if job.cfg.write_back == "strict":
        raise WriteBackError(msg)
    warn(msg, WriteBackWarning)
    warn_eager_gap(_original(job), job.called, job.analysis.macs(), job.macs)   # the graph vs the eager model
    return dataclasses.replace(job, result=_batch_free(job))


def _capture_mode(job: Job) -> str:
    """Static shapes where the graph only serves analysis and verification (a data-free MAC budget written
    back into the user's modules: torch.export is ~2x faster without a symbolic batch); else a dynamic batch
    (searches and BN re-estimation run other batch sizes, graph outputs keep it; a latency budget is
    measured at other batch sizes too). Decided from the parsed goal (its form needs no model: unit bases);
    a budget that does not parse is refused by ``analyze``, as before."""
    try:
        latency = parse_budget(job.budget, 1.0, 1.0).latency is not None
    except BudgetError:
        latency = False
    return "static" if _module_result(job) and job.data is None and not latency else "batch"


def _batch_free(job: Job) -> GraphModule:
    """The verified graph with a dynamic batch: a static capture is captured again (a fallback result is
    used like a model: any batch size), kept when it matches."""
    if job.gm.meta.get(meta.DYNAMIC) or not isinstance(job.model, nn.Module):
        return job.gm
    try:
        gm = capture(job.gm, job.inputs, dynamic="batch")
        verify.check_close(job.outputs, verify.outputs(gm, job.inputs), job.cfg, "re-capturing the graph")
    except FxAdaptError:
        return job.gm
    gm.meta.update({k: v for k, v in job.gm.meta.items() if k not in gm.meta})
    return gm.train(job.gm.training)


def _module_result(job: Job) -> bool:
    return job.cfg.output == "module" and isinstance(job.model, nn.Module) and not job.cfg.fold_bn


def _graph_result(job: Job) -> bool:
    return job.cfg.output != "module" and isinstance(job.model, nn.Module) and not job.cfg.fold_bn


def _dynamic_graph(job: Job) -> Job:
    """Graph outputs with free sequence / image axes: the plan written back into the user's modules and that
    model captured with ``dynamic="auto"``, kept when it matches the verified graph (outputs and MACs);
    otherwise the verified graph (dynamic batch only) is returned."""
    cfg = job.cfg
    ref = Reference(job.gm, job.planned, job.macs, job.outcome.preserving, cfg.rtol, cfg.atol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wb = write_back(job.model, job.outcome.plan, job.inputs, ref)
        if wb.module is None:
            return job
        try:
            gm = capture(wb.module, job.inputs, dynamic="auto")
            macs, got = run_counted(gm, job.inputs)
            verify.check_close(verify.outputs(job.gm, job.inputs), got, cfg, "re-capturing with free axes")
        except FxAdaptError:
            return job
    if abs(macs - job.macs) > 1e-3 * max(macs, 1.0):
        return job
    gm.train(job.gm.training)
    return dataclasses.replace(job, gm=gm)


def _export(job: Job) -> Job:

    return dataclasses.replace(job, result=to_exported_program(job.gm, job.inputs))


def _fold_asked(job: Job) -> bool:
    return job.cfg.fold_bn


def _program_result(job: Job) -> bool:
    return job.cfg.output == "exported_program"


CAPTURE = Step("capture", _capture)
ANALYZE = Step("analyze", _analyze)
PLAN = Step("plan", _plan)
WRITE_BACK = Step("write_back", _write_back, _module_result)
REPLAN = (                 # what a re-plan runs again (``_replanned``), from the captured graph to verify
    PLAN,
    Step("materialize", _materialize),
    Step("rewire_blocks", _rewire),
    Step("recalibrate_bn", _recalibrate, _with_data),
    Step("recover", recover, recovering),
    Step("fold_bn", _fold, _fold_asked),
    Step("verify", _verify),
)
PIPELINE = (
    CAPTURE,
    ANALYZE,
    *REPLAN,
    WRITE_BACK,
    Step("dynamic_graph", _dynamic_graph, _graph_result),
    Step("export", _export, _program_result),
)
RETRIES = {WRITE_BACK: _retried}   # the orchestrator's loop after a step (``run_steps(..., then=RETRIES)``)


def transform(model: nn.Module, budget: Any, example_inputs: Any, data: Any = None, val_data: Any = None,
              config: TransformConfig | None = None, **options: Any):
    """Return a copy of ``model`` (an ``nn.Module`` or a ``torch.export.ExportedProgram``) adapted to
    ``budget``.

    ``options`` are ``TransformConfig`` fields (``strategy``, ``device``, ``search``, ``fold_bn``, ``solve``,
    ...) and override ``config``; an unknown one is an ``InputError`` listing the valid ones.
    ``data``/``val_data`` (tensors ``(x, y)``, a Dataset or a DataLoader) enable the searches and BatchNorm
    re-estimation. A list of budgets returns a list of models, one per budget, from one capture and (DNA)
    one search (``fxadapt.pipeline.many``). See the module docstring for the pipeline."""
    if isinstance(budget, (list, tuple)):
        return transform_many(model, budget, example_inputs, data, val_data, config, **options)
    cfg = transform_config(config, options, data, val_data)
    start = time.perf_counter()
    data, val_data = checked_data(model, example_inputs, data, val_data, cfg)
    job = Job(model, example_inputs, budget, cfg, data, val_data)
    return finish(run_steps(PIPELINE, job, cfg.progress, then=RETRIES), start)


SHARED = (CAPTURE, ANALYZE)                                        # many budgets: run once for all of them
REST = tuple(s for s in PIPELINE if s not in (*SHARED, PLAN))      # ... and per budget, after its plan


def transform_many(model: nn.Module, budgets: Sequence[Any], example_inputs: Any, data: Any = None,
                   val_data: Any = None, config: TransformConfig | None = None, **options: Any) -> list:
    """One adapted model per budget (``fxadapt.pipeline.many``: ``SHARED`` once, the budgets planned
    together, ``REST`` per budget); ``options`` as for ``transform``."""
    if not budgets:
        raise InputError("give at least one budget (a list of budgets returns one model per budget)")
    cfg = transform_config(config, options, data, val_data)
    start = time.perf_counter()
    data, val_data = checked_data(model, example_inputs, data, val_data, cfg)
    job = run_steps(SHARED, Job(model, example_inputs, budgets[0], cfg, data, val_data), cfg.progress)
    goals = [resolve(b, job.analysis) for b in budgets]
    results = []
    for budget, goal, outcome in zip(budgets, goals, many.outcomes(job, list(budgets), goals)):
        one = dataclasses.replace(job, budget=budget, goal=goal, outcome=outcome, gm=outcome.base,
                                  timings=job.timings + (("plan", 0.0),))
        results.append(finish(run_steps(REST, one, cfg.progress, then=RETRIES), start))
    return results


def finish(job: Job, start: float):
    """The model ``transform`` hands back from a finished job, with its ``fxadapt.report`` attached."""
    cfg, model, out = job.cfg, job.model, job.gm
    if not cfg.fold_bn and isinstance(model, nn.Module):
        out.train(model.training)
    rep = Report.build(job.analysis, job.outcome, out, job.goal, job.macs, cfg.strategy,
                       time.perf_counter() - start)
    result = job.result if job.result is not None else out
    kind = ("exported_program" if isinstance(result, ExportedProgram)
            else "graph" if isinstance(result, GraphModule) else "module")
    rep = dataclasses.replace(rep, timings=job.timings, returned=kind, write_back=_not_written(job),
                              recovery=job.recovered,
                              dynamic=tuple(job.gm.meta.get(meta.DYNAMIC, ())) if kind != "module" else ())
    attach(out, rep)
    if job.result is not None and job.result is not out:
        if isinstance(job.result, nn.Module) and not cfg.fold_bn:
            job.result.train(model.training if isinstance(model, nn.Module) else False)
        return attach(job.result, rep)
    return out


def _not_written(job: Job) -> str:
    """Why the plan could not be written back into the user's modules ("" where it was, or not asked)."""
    return job.written.reason or "" if job.written is not None and job.written.module is None else ""


def _copy(gm: GraphModule) -> GraphModule:
    return copy.deepcopy(gm)
