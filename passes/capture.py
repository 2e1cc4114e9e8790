"""Capture: any ``nn.Module`` to a trainable ATen-level ``torch.fx.GraphModule`` (``fxadapt.capture``).

``torch.export`` and its tidying are ``fxadapt.ir.capture`` (``export_model``, ``tidied``); this module adds
the one pass capture runs, ``lift_modules`` (parametric ATen calls back into ``nn`` modules, so the result
trains, evaluates and slices like a model), lints the graph and records the inputs (``stamp``). It lives
with the passes because ``fxadapt.ir`` sits below them.

>>> import torch
>>> gm = capture(torch.nn.Linear(4, 2), {"input": torch.randn(1, 4)})
>>> gm(input=torch.randn(3, 4)).shape
torch.Size([3, 2])
"""

from __future__ import annotations

from typing import Any

import torch
from fxadapt.passes.lift_modules import LiftConfig, lift_modules
from torch import nn
from torch.fx import GraphModule

from fxadapt.ir.capture import export_model, stamp, tidied


def capture(model: nn.Module, example_inputs: Any, dynamic: str = "batch") -> GraphModule:
    """Lift ``model`` to a trainable ATen-level ``GraphModule`` (``fxadapt.ir.capture``'s module docstring);
    ``dynamic="auto"`` also leaves sequence / image axes free where the model allows (``meta[DYNAMIC_KEY]``
    says which)."""
    exported = export_model(model, example_inputs, dynamic)
    return stamp(from_program(exported.program, exported.work), model, exported, dynamic)


def from_program(ep: torch.export.ExportedProgram, origin: nn.Module | None = None) -> GraphModule:
    """The steps of ``capture`` after ``torch.export``: the program's module, tidied (guards dropped, shared
    tensors under one name, source lines recorded) and lifted to ``nn`` modules (BatchNorm momentum read
    from ``origin``, the exported module, when given)."""
    result = lift_modules(tidied(ep), LiftConfig(origin=origin)).graph_module
    result.graph.lint()   # its code was generated from this graph when lift_modules built the module
    return result
