"""What ``fxadapt.transform`` hands back when the result is a graph, not the user's own modules.

- ``graph_fallback``: the plan could not be written back (``job.written`` holds the typed failure): the
  verified graph with a ``WriteBackWarning`` (``write_back="strict"``: a ``WriteBackError``), captured again
  with a dynamic batch where the capture was static, kept when its outputs match;
- ``dynamic_graph`` (graph outputs of an ``nn.Module``): the plan written back into the user's modules and
  that model captured with free sequence / image axes (``dynamic="auto"``), kept when its outputs are close
  to the verified graph's and its MACs ``m`` equal the verified ``m0`` (``|m - m0| <= 1e-3 max(m, 1)``);
- ``export_step``: the verified graph as a ``torch.export.ExportedProgram``.

Example:
    >>> import torch
    >>> from fxadapt.pipeline.config import TransformConfig
    >>> from fxadapt.pipeline.job import Job
    >>> program_result(Job(torch.nn.Linear(4, 3), (torch.randn(1, 4),), 0.5,
    ...                    TransformConfig(output="exported_program")))
    True
"""

from __future__ import annotations

import dataclasses
import warnings

from torch import nn
from torch.fx import GraphModule

from fxadapt import meta
from fxadapt.analysis.count import run_counted
from fxadapt.checks import verify
from fxadapt.errors import FxAdaptError, WriteBackError, WriteBackWarning, warn
from fxadapt.passes.capture import capture
from fxadapt.pipeline.eager_check import warn_eager_gap
from fxadapt.pipeline.job import Job, original
from fxadapt.pipeline.program import to_exported_program
from fxadapt.writeback.build import Reference, write_back


def graph_fallback(job: Job) -> Job:
    """The verified graph as the result, where the plan could not be written back (``job.written``)."""
    reason = job.written.reason
    msg = (f"{type(job.model).__name__}: the adapted sizes could not be written back into its own modules "
           f"({reason}); returning the verified graph (a torch.fx.GraphModule) instead")
    if job.cfg.write_back == "strict":
        raise WriteBackError(msg)
    warn(msg, WriteBackWarning)
    warn_eager_gap(original(job), job.called, job.analysis.macs(), job.macs)   # the graph vs the eager model
    return dataclasses.replace(job, result=_batch_free(job))


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


def dynamic_graph(job: Job) -> Job:
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


def program_result(job: Job) -> bool:
    return job.cfg.output == "exported_program"


def export_step(job: Job) -> Job:
    return dataclasses.replace(job, result=to_exported_program(job.gm, job.inputs))
