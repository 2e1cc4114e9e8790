"""The ``Job`` that ``fxadapt.transform``'s steps hand on, and what it asks for.

A step is a function ``Job -> Job`` (``fxadapt.pipeline.runner``): it reads the fields the steps before it
set and returns a new job (``dataclasses.replace``) with its own; nothing is changed in place. What the
caller asked for decides which steps run and how:

- a *module result* (``output="module"``, an ``nn.Module`` given, no ``fold_bn``): the plan is written back
  into a deep copy of the user's own modules (``fxadapt.writeback``);
- a *graph result* (another ``output``, an ``nn.Module`` given, no ``fold_bn``): the verified graph, captured
  again with free axes where it matches (``fxadapt.pipeline.graph_output``);
- otherwise (an ``ExportedProgram`` given, or ``fold_bn``) the verified graph itself.

Example:
    >>> import torch
    >>> from fxadapt.pipeline.config import TransformConfig
    >>> job = Job(torch.nn.Linear(4, 3), (torch.randn(1, 4),), 0.5, TransformConfig())
    >>> module_result(job), graph_result(job), original(job) is job.model
    (True, False, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.export import ExportedProgram
from torch.fx import GraphModule

from fxadapt.analysis import Analysis
from fxadapt.ir.inputs import Inputs
from fxadapt.pipeline.cache_check import CacheFailure
from fxadapt.pipeline.config import TransformConfig
from fxadapt.pipeline.strategies import Outcome
from fxadapt.planning.budget import Goal
from fxadapt.writeback.build import WriteBack


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


def original(job: Job) -> nn.Module:
    """The user's model as a module (an ExportedProgram's ``module()``)."""
    return job.model.module() if isinstance(job.model, ExportedProgram) else job.model


def module_result(job: Job) -> bool:
    """Whether the plan goes back into the user's own modules (see the module docstring)."""
    return job.cfg.output == "module" and isinstance(job.model, nn.Module) and not job.cfg.fold_bn


def graph_result(job: Job) -> bool:
    """Whether a graph is handed back for an ``nn.Module`` (see the module docstring)."""
    return job.cfg.output != "module" and isinstance(job.model, nn.Module) and not job.cfg.fold_bn
