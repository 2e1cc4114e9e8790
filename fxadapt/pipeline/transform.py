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

The steps from the captured graph to the verified one live in ``fxadapt.pipeline.steps``, the graph results'
in ``fxadapt.pipeline.graph_output``, the ``Job`` they hand on in ``fxadapt.pipeline.job``; this module
captures, writes back, owns the retries and lists the steps.

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

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule

from fxadapt import meta
from fxadapt.checks.verify import VerificationError  # noqa: F401  (re-export)
from fxadapt.errors import (
    BudgetError,
    FxAdaptError,
    InputError,
    ReplanWarning,
    WriteBackError,
    WriteBackWarning,
    warn,
)
from fxadapt.ir.capture import as_called
from fxadapt.ir.inputs import as_inputs
from fxadapt.passes.capture import capture
from fxadapt.pipeline import cache_check, many, replan
from fxadapt.pipeline.cache_check import cached_failure
from fxadapt.pipeline.config import TransformConfig, checked_data, transform_config
from fxadapt.pipeline.graph_output import dynamic_graph, export_step, graph_fallback, program_result
from fxadapt.pipeline.job import Job, graph_result, module_result, original
from fxadapt.pipeline.program import captured_from_program
from fxadapt.pipeline.recovery import recover, recovering
from fxadapt.pipeline.report import Report, attach
from fxadapt.pipeline.runner import Step, run_steps
from fxadapt.pipeline.steps import (
    analyze_step,
    fold_asked,
    fold_step,
    materialize_step,
    plan_step,
    recalibrate_step,
    resolve,
    rewire_step,
    verify_step,
    with_data,
)
from fxadapt.pipeline.strategies import STRATEGIES, Outcome, SearchInterrupted  # noqa: F401  (re-export)
from fxadapt.planning.budget import parse_budget
from fxadapt.search.dna import SearchConfig  # noqa: F401  (re-export)
from fxadapt.writeback.build import Reference, WriteBack, write_back


def _capture(job: Job) -> Job:
    if isinstance(job.model, ExportedProgram):

        gm = captured_from_program(job.model, job.example_inputs)
        gm.meta.setdefault(meta.INPUTS, as_inputs(job.example_inputs))
    else:
        with warnings.catch_warnings():
            if module_result(job):   # the graph drops the KV cache; the model handed back keeps it
                warnings.filterwarnings("ignore", message=r"fxadapt\.capture: calling .* use_cache=False")
            gm = capture(job.model, job.example_inputs, dynamic=_capture_mode(job))
    inputs = gm.meta[meta.INPUTS]
    return dataclasses.replace(job, gm=gm, inputs=inputs, called=as_called(original(job), inputs))


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
    return "static" if module_result(job) and job.data is None and not latency else "batch"


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
    done = _until_written(job)
    return graph_fallback(job) if done is None else _until_cached(done)


def _until_written(job: Job) -> Job | None:
    """``job`` re-planned with the ties ``replan`` finds in its failed write-backs until one is written back;
    None when none is."""
    datafree, tries = job.cfg.strategy == "datafree", 0
    while job.written.failure is not None:
        found = replan.write_back_tie(job) if datafree and tries < replan.RETRIES else None
        again = _replanned(job, *found) if found is not None and found[0] not in job.ties else None
        if again is None:
            return None
        job, tries = again, tries + 1
    return job


def _until_cached(job: Job) -> Job:
    """The written-back ``job`` re-planned with the ties ``cache_check`` finds in its cached path's failures
    until that path runs; else the first one, warned (``write_back="strict"``: a ``WriteBackError``)."""
    datafree = job.cfg.strategy == "datafree"
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


CAPTURE = Step("capture", _capture)
ANALYZE = Step("analyze", analyze_step)
PLAN = Step("plan", plan_step)
WRITE_BACK = Step("write_back", _write_back, module_result)
REPLAN = (                 # what a re-plan runs again (``_replanned``), from the captured graph to verify
    PLAN,
    Step("materialize", materialize_step),
    Step("rewire_blocks", rewire_step),
    Step("recalibrate_bn", recalibrate_step, with_data),
    Step("recover", recover, recovering),
    Step("fold_bn", fold_step, fold_asked),
    Step("verify", verify_step),
)
PIPELINE = (
    CAPTURE,
    ANALYZE,
    *REPLAN,
    WRITE_BACK,
    Step("dynamic_graph", dynamic_graph, graph_result),
    Step("export", export_step, program_result),
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
    seconds = time.perf_counter() - start
    rep = Report.build(job.analysis, job.outcome, out, job.goal, job.macs)
    result = job.result if job.result is not None else out
    kind = ("exported_program" if isinstance(result, ExportedProgram)
            else "graph" if isinstance(result, GraphModule) else "module")
    rep = dataclasses.replace(rep, strategy=cfg.strategy, seconds=seconds, timings=job.timings, returned=kind,
                              write_back=_not_written(job), recovery=job.recovered,
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
