"""``fxadapt.transform``: adapt a model to a budget, end to end, as a flat list of named passes.

The pipeline, as ``PIPELINE`` reads (``fxadapt.pipeline.runner`` lints and shape-checks after each step):

    capture        model (or ExportedProgram) -> trainable ATen-level GraphModule     fxadapt.ir.capture
    analyze        channel groups, blocks, cost model (cross-checked); budget parsed   fxadapt.analysis
    plan           strategy: datafree solve, or dna / fur search -> Plan               fxadapt.pipeline.strategies
    materialize    slice / widen every site                                            passes.materialize
    rewire_blocks  remove / repeat residual blocks                                     passes.rewire_blocks
    recalibrate_bn re-estimate BatchNorm statistics (only with data, when shrinking)   fxadapt.train.recalibrate
    fold_bn        fold BatchNorm into conv/linear (only with fold_bn=True)            passes.fold_bn
    verify         runs, shapes, MACs by an independent count, function preservation   fxadapt.pipeline.verify
    write_back     the plan in a deep copy of the user's own modules, checked against   fxadapt.writeback
                   the graph (only with output="module", the default)
    dynamic_graph  graph outputs: that model re-captured with free sequence / image axes, kept if it
                   matches the verified graph
    export         hand back a torch.export.ExportedProgram (only with output="exported_program")

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule

from fxadapt import meta
from fxadapt.analysis import Analysis, analyze
from fxadapt.analysis.count import run_counted
from fxadapt.errors import BudgetError, FxAdaptError, GrowthWarning, warn
from fxadapt.export.report import Report, attach
from fxadapt.ir.capture import as_called, capture
from fxadapt.ir.inputs import Inputs, as_inputs
from fxadapt.passes.fold_bn import fold_bn as fold_bn_pass
from fxadapt.passes.materialize import materialize
from fxadapt.passes.rewire_blocks import rewire_blocks
from fxadapt.pipeline import verify
from fxadapt.pipeline.config import TransformConfig, transform_config
from fxadapt.pipeline.runner import Step, run_steps
from fxadapt.pipeline.strategies import STRATEGIES, Outcome, SearchInterrupted  # noqa: F401  (re-export)
from fxadapt.pipeline.verify import VerificationError  # noqa: F401  (re-export)
from fxadapt.planning.budget import Goal, parse_budget
from fxadapt.search.dna import SearchConfig  # noqa: F401  (re-export)
from fxadapt.train.recalibrate import recalibrate_bn
from fxadapt.writeback.build import Reference


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
    gm: GraphModule | None = None
    planned: GraphModule | None = None          # the graph the plan was materialised from
    analysis: Analysis | None = None
    goal: Goal | None = None        # the budget resolved against the model: MACs, params, latency, target
    outcome: Outcome | None = None
    macs: float = 0.0
    outputs: Any = None            # the adapted graph's outputs at the example inputs (verify ran it)
    reference: Any = None          # what verify compared them with (the original's outputs or shapes)
    result: nn.Module | GraphModule | ExportedProgram | None = None
    note: str = ""
    ties: tuple[frozenset[int], ...] = ()   # groups the plan gives one width (``fxadapt.pipeline.replan``)
    timings: tuple[tuple[str, float], ...] = ()


def _capture(job: Job) -> Job:
    if isinstance(job.model, ExportedProgram):
        from fxadapt.export.program import captured_from_program

        gm = captured_from_program(job.model, job.example_inputs)
        gm.meta.setdefault(meta.INPUTS, as_inputs(job.example_inputs))
    else:
        with warnings.catch_warnings():
            if _module_result(job):   # the graph drops the KV cache; the model handed back keeps it
                warnings.filterwarnings("ignore", message=r"fxadapt\.capture: calling .* use_cache=False")
            gm = capture(job.model, job.example_inputs, dynamic=_capture_mode(job))
    return dataclasses.replace(job, gm=gm, inputs=gm.meta[meta.INPUTS])


def _attention(job: Job) -> str:
    """``"auto"`` is whole heads when the result goes back into the user's modules (an attention module has one
    ``head_dim`` for q, k and v, which per-piece head sizes would break); the analysis' own ``"auto"`` (heads
    with rotary embeddings, else head_dim) for graph outputs."""
    return "heads" if job.cfg.attention == "auto" and _module_result(job) else job.cfg.attention


def _analyze(job: Job) -> Job:
    a = analyze(job.gm, attention=_attention(job))
    goal = resolve(job.budget, a)
    if not a.prunable:
        reasons = sorted({g.reason for g in a.groups if g.reason})
        raise BudgetError(f"{type(job.model).__name__} has no prunable channel group: "
                          + ("; ".join(reasons[:3]) if reasons else "it has no conv, linear or embedding layer"))
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
        ref_model = job.model.module() if isinstance(job.model, ExportedProgram) else job.model
        reference = verify.outputs(ref_model, as_called(ref_model, job.inputs))
    else:  # the original graph's recorded output shapes, as torch.export traced them
        reference = verify.recorded_outputs(job.analysis.gm)
    verify.check_shapes(reference, got)
    _report_growth_error(job, got)
    if job.outcome.preserving:
        verify.check_close(reference, got, job.cfg, "function-preserving growth / identity",
                           (ref_model, job.gm), job.inputs)
    o = job.outcome
    predicted = o.analysis.cost.macs(o.plan.units, {b: 0.0 for b in o.plan.remove})
    verify.check_predicted(macs, predicted)
    if job.goal.macs is not None:   # where the params bind, the MACs lie below their window: only the side holds
        head = o.history[0] if o.history and isinstance(o.history[0], dict) else {}
        solve = dataclasses.replace(job.cfg.solve, strict=False) if head.get("binding") == "params" else job.cfg.solve
        verify.check_budget(macs, job.goal.macs, job.analysis.macs(), solve)
    if job.goal.params is not None:
        verify.check_params(job.gm, job.goal.params)
    return dataclasses.replace(job, macs=macs, outputs=got, reference=reference)


def _report_growth_error(job: Job, got) -> None:
    """Non-preserving growth (``SolveConfig(preserve=False)``): warn with the output error against the
    original (max |difference| over max |original|, at the example inputs)."""
    head = job.outcome.history[0] if job.outcome.history else {}
    grown = head.get("grown_under_norm") if isinstance(head, dict) else None
    if not grown:
        return
    import torch.utils._pytree as pytree

    ref_model = job.model.module() if isinstance(job.model, ExportedProgram) else job.model
    ref = [t for t in pytree.tree_leaves(verify.outputs(ref_model, as_called(ref_model, job.inputs)))
           if isinstance(t, torch.Tensor) and t.is_floating_point()]
    out = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    err = max(float((o - r).abs().max() / r.abs().max().clamp_min(1e-12)) for o, r in zip(out, ref))
    head["function_error"] = err
    warn(f"growth under a norm is not function-preserving (SolveConfig(preserve=False)): {', '.join(grown[:3])}"
         f"{' ...' if len(grown) > 3 else ''} widened; outputs differ from the original by {err:.2e} (max |diff| "
         f"/ max |original| at the example inputs): fine-tune the result", GrowthWarning)


def _write_back(job: Job) -> Job:
    """The plan in a deep copy of the user's own modules, checked against the verified graph; where the model's
    code reads a size the plan split, the plan is made again with those groups tied (``replan``); a model with a
    cache is run once with it too (``cache_check``)."""
    from fxadapt.pipeline.cache_check import cache_checked
    from fxadapt.pipeline.replan import replanned
    from fxadapt.writeback import WriteBackError, WriteBackWarning

    wb = written(job)
    if wb.module is None:
        again = replanned(job, wb)
        if again is not None:
            return cache_checked(again)
        msg = (f"{type(job.model).__name__}: the adapted sizes could not be written back into its own modules "
               f"({wb.reason}); returning the verified graph (a torch.fx.GraphModule) instead")
        if job.cfg.write_back == "strict":
            raise WriteBackError(msg)
        warn(msg, WriteBackWarning)
        return dataclasses.replace(job, result=_batch_free(job), note=wb.reason)
    return cache_checked(module_job(job, wb))


def written(job: Job):
    """``write_back`` of the job's plan into a deep copy of its model (a ``WriteBack``)."""
    from fxadapt.writeback import write_back

    cfg = job.cfg
    ref = Reference(job.gm, job.planned, job.macs, job.outcome.preserving, cfg.rtol, cfg.atol, job.outputs,
                    job.reference)
    return write_back(job.model, job.outcome.plan, job.inputs, ref)


def module_job(job: Job, wb) -> Job:
    """The job with the written-back module as its result (its recipe attached)."""
    object.__setattr__(wb.module, "fxadapt_recipe", wb.recipe)
    return dataclasses.replace(job, result=wb.module)


def _capture_mode(job: Job) -> str:
    """Static shapes where the graph only serves analysis and verification (a data-free MAC budget written
    back into the user's modules: torch.export is ~2x faster without a symbolic batch); else a dynamic batch
    (searches and BN re-estimation run other batch sizes, graph outputs keep it)."""
    budget = job.budget
    latency = getattr(budget, "latency", None) is not None or "latency" in str(budget)
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
    from fxadapt.ir.capture import capture as capture_model
    from fxadapt.writeback import write_back

    cfg = job.cfg
    ref = Reference(job.gm, job.planned, job.macs, job.outcome.preserving, cfg.rtol, cfg.atol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wb = write_back(job.model, job.outcome.plan, job.inputs, ref)
        if wb.module is None:
            return job
        try:
            gm = capture_model(wb.module, job.inputs, dynamic="auto")
            macs, got = run_counted(gm, job.inputs)
            verify.check_close(verify.outputs(job.gm, job.inputs), got, cfg, "re-capturing with free axes")
        except FxAdaptError:
            return job
    if abs(macs - job.macs) > 1e-3 * max(macs, 1.0):
        return job
    gm.train(job.gm.training)
    return dataclasses.replace(job, gm=gm)


def _export(job: Job) -> Job:
    from fxadapt.export.program import to_exported_program

    return dataclasses.replace(job, result=to_exported_program(job.gm, job.inputs))


PIPELINE = (
    Step("capture", _capture),
    Step("analyze", _analyze),
    Step("plan", _plan),
    Step("materialize", _materialize),
    Step("rewire_blocks", _rewire),
    Step("recalibrate_bn", _recalibrate, _with_data),
    Step("fold_bn", _fold, lambda job: job.cfg.fold_bn),
    Step("verify", _verify),
    Step("write_back", _write_back, _module_result),
    Step("dynamic_graph", _dynamic_graph, _graph_result),
    Step("export", _export, lambda job: job.cfg.output == "exported_program"),
)


def transform(model: nn.Module, budget: Any, example_inputs: Any, data: Any = None, val_data: Any = None,
              config: TransformConfig | None = None, **options: Any):
    """Return a copy of ``model`` (an ``nn.Module`` or a ``torch.export.ExportedProgram``) adapted to ``budget``.

    ``options`` are ``TransformConfig`` fields (``strategy``, ``device``, ``search``, ``fold_bn``, ``solve``,
    ...) and override ``config``; an unknown one is an ``InputError`` listing the valid ones. ``data``/``val_data``
    (tensors ``(x, y)``, a Dataset or a DataLoader) enable the searches and BatchNorm re-estimation. A list
    of budgets returns a list of models, one per budget, from one capture and (DNA) one search
    (``fxadapt.pipeline.many``). See the module docstring for the pipeline."""
    if isinstance(budget, (list, tuple)):
        from fxadapt.pipeline.many import transform_many

        return transform_many(model, budget, example_inputs, data, val_data, config, **options)
    cfg = transform_config(config, options, data, val_data)
    start = time.perf_counter()
    job = Job(model, example_inputs, budget, cfg, data, val_data)
    return finish(run_steps(PIPELINE, job, cfg.progress), start)


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
    rep = dataclasses.replace(rep, timings=job.timings, returned=kind, write_back=job.note,
                              dynamic=tuple(job.gm.meta.get(meta.DYNAMIC, ())) if kind != "module" else ())
    attach(out, rep)
    if job.result is not None and job.result is not out:
        if isinstance(job.result, nn.Module) and not cfg.fold_bn:
            job.result.train(model.training if isinstance(model, nn.Module) else False)
        return attach(job.result, rep)
    return out


def _copy(gm: GraphModule) -> GraphModule:
    import copy

    return copy.deepcopy(gm)
