"""``torch.export.ExportedProgram`` handoff, both ways, for model compilers (AOTInductor, ExecuTorch,
TensorRT).

- ``to_exported_program(model, example_inputs)``: ``torch.export`` (non-strict) of an eval-mode copy of an
  adapted model, with a dynamic batch axis where the model allows it (static shapes otherwise), checked:
  ``ep.module()(*inputs)`` must match the model to ``atol * max(1, max|ref|)`` (``ATOL`` of the model's
  dtype), and at batch size 3 as well when the batch axis is dynamic.
- ``captured_from_program(ep, example_inputs)``: the steps ``fxadapt.capture`` runs after its own
  ``torch.export``, applied to an existing program (no second capture): ``ep.module()``, drop the guard
  module, one name per shared tensor, source lines into ``node.meta``, lift parametric ATen calls into
  ``nn`` modules (``passes/lift_modules``), lint. The result is what ``analyze`` and ``transform`` take; it
  is checked against ``ep.module()`` on the example inputs. The program must come from an eval-mode model
  (``torch.export.export(model.eval(), ...)``, before ``run_decompositions``); its batch axis is dynamic only
  if it was exported so.
- ``from_exported_program(ep)``: the same with the example inputs recorded in the program.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    >>> x = torch.randn(1, 3, 8, 8)
    >>> ep = to_exported_program(model, (x,))
    >>> ep.module()(torch.randn(5, 3, 8, 8)).shape      # dynamic batch
    torch.Size([5, 4, 6, 6])
    >>> gm = captured_from_program(ep, (x,))
    >>> [type(m).__name__ for m in gm.children()]
    ['Conv2d', 'BatchNorm2d']
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxadapt import meta
from fxadapt.errors import InputError
from fxadapt.hw.onnx import ATOL, ExportError, float_dtype
from fxadapt.ir import capture as cap
from fxadapt.ir.capture import normalize_inputs
from fxadapt.passes.capture import from_program

# op -> index of its ``training`` arg
TRAINING_OPS = {"aten.batch_norm.default": 5, "aten.dropout.default": 2}


def to_exported_program(model: nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """``torch.export`` of an eval-mode copy of ``model`` (dynamic batch where possible), checked against
    it."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    ep = _export(work, inputs)
    _check(ep.module(), work, inputs, "ep.module()")
    if _dynamic_batch(ep):
        batch3 = _rebatch(inputs, 3)
        _check(ep.module(), work, batch3, "ep.module() at batch size 3")
    return ep


def captured_from_program(ep: torch.export.ExportedProgram, example_inputs: Any = None,
                          model: nn.Module | None = None) -> GraphModule:
    """fxadapt's captured ``GraphModule`` from an existing ``ExportedProgram`` (see the module docstring).

    ``example_inputs`` defaults to those recorded in ``ep``; ``model`` (optional) is the module ``ep`` was
    exported from: BatchNorm momentum, which an eval-mode export does not record, is read from it.
    """
    if not isinstance(ep, torch.export.ExportedProgram):
        raise InputError(f"expected a torch.export.ExportedProgram, got {type(ep).__name__}")
    _refuse_training(ep)
    inputs = _program_inputs(ep, example_inputs)
    gm = from_program(ep, model)
    gm.eval()
    _check(gm, ep.module(), inputs, "the lifted graph")
    batch = next((v.shape[0] for v in pytree.tree_leaves(inputs) if isinstance(v, torch.Tensor) and v.dim()),
                 1)
    gm.meta[meta.BATCH] = int(batch)
    return gm


def from_exported_program(ep: torch.export.ExportedProgram) -> GraphModule:
    """A trainable ``GraphModule`` of ``nn`` modules from ``ep``, using the example inputs ``ep`` recorded.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    >>> ep = torch.export.export(model, (torch.randn(1, 3),))
    >>> gm = from_exported_program(ep)
    >>> [type(m).__name__ for m in gm.children()], gm(torch.randn(1, 3)).shape
    (['Linear'], torch.Size([1, 2]))
    """
    return captured_from_program(ep)


def _export(work: nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    """capture's dynamic-batch ``export`` helper when it is there (read at the call: a test may patch it)."""
    export = getattr(cap, "export", None)
    try:
        if export is not None:
            return export(work, inputs)
        return torch.export.export(work, inputs, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised as one line (CaptureError included)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.export failed on {type(work).__name__}: {first}; check that the model runs "
                          f"on the example inputs in eval mode") from e


def _dynamic_batch(ep: torch.export.ExportedProgram) -> bool:
    """Whether the first user input's leading axis is symbolic in ``ep``."""
    users = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in users and isinstance(val, torch.Tensor) and val.dim():
            return not isinstance(val.shape[0], int)
    return False


def _rebatch(inputs: tuple, n: int) -> tuple:
    """Inputs with every tensor's leading axis resized to ``n`` (rows repeated cyclically)."""
    def grow(v: Any) -> Any:
        if not (isinstance(v, torch.Tensor) and v.dim()):
            return v
        return v[torch.arange(n) % v.shape[0]]
    return pytree.tree_map(grow, inputs)


def _check(got_model: nn.Module, ref_model: nn.Module, inputs: tuple, what: str) -> None:
    """``got_model`` matches ``ref_model`` on ``inputs`` to ``ATOL`` of the dtype times the output
    magnitude."""
    with torch.no_grad():
        ref, got = ref_model(*inputs), got_model(*inputs)
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if ref_spec != got_spec:
        raise ExportError(f"{what} returns a different output structure than the model: {got_spec} vs "
                          f"{ref_spec}")
    tensors = [t for t in ref_leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
    scale = max([1.0] + [float(t.abs().max()) for t in tensors])
    tol = ATOL.get(float_dtype(ref_model, inputs), 1e-4)
    try:
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale)
    except AssertionError as e:
        lines = [s.strip() for s in str(e).splitlines() if "difference" in s.lower()]
        raise ExportError(f"{what} does not match the model ({'; '.join(lines) or 'values differ'}); "
                          f"report this with the model") from e


def _refuse_training(ep: torch.export.ExportedProgram) -> None:
    """A program exported in training mode bakes batch statistics and dropout into the graph: refuse it."""
    for node in ep.graph.nodes:
        at = TRAINING_OPS.get(str(node.target)) if node.op == "call_function" else None
        if at is not None and len(node.args) > at and node.args[at] is True:
            raise InputError(f"the ExportedProgram was exported in training mode ({node.target} with "
                             f"training=True); export model.eval() instead")


def _program_inputs(ep: torch.export.ExportedProgram, example_inputs: Any) -> tuple:
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    recorded = getattr(ep, "example_inputs", None)
    if not recorded:
        raise InputError("this ExportedProgram records no example inputs; pass example_inputs=(x,)")
    args, kwargs = recorded
    if kwargs:
        raise InputError("the ExportedProgram was exported with keyword inputs; pass example_inputs as a "
                         "tuple")
    return normalize_inputs(tuple(args))
