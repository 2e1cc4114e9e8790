"""Capture: lift any ``nn.Module`` to a trainable ATen-level ``torch.fx.GraphModule``.

Steps: validate the model and example inputs (and run the model once on them, so a wrong input is
reported as such and not as a tracing failure); deep-copy the model in eval mode (the caller's model is
never touched); ``torch.export.export(strict=False)`` with a dynamic batch axis where the model allows it
(static shapes otherwise); drop export's guard module; lift parametric ATen calls back into ``nn``
modules (``passes/lift_modules``) so ``.train()``/``.eval()`` work; lint.

Example:
    >>> import torch
    >>> from fxadapt import capture
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    >>> gm = capture(model, (torch.randn(1, 3, 16, 16),))
    >>> gm(torch.randn(4, 3, 16, 16)).shape   # batch size is free
    torch.Size([4, 8, 14, 14])
"""

from __future__ import annotations

import copy
import dataclasses
import re
import traceback
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxadapt import meta
from fxadapt.errors import CaptureError, InputError
from fxadapt.passes.lift_modules import LiftConfig, lift_modules


def normalize_inputs(example_inputs: Any) -> tuple:
    """Example inputs as a tuple of positional inputs (a bare tensor is accepted and wrapped)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise InputError(
            f"example_inputs must be a tuple of positional inputs (tensors or pytrees), as for torch.export; "
            f"got {type(example_inputs).__name__}. Wrap a single tensor as (x,).")
    leaves = pytree.tree_leaves(example_inputs)
    if not any(isinstance(v, torch.Tensor) for v in leaves):
        raise InputError("example_inputs holds no tensor")
    return example_inputs


def check_runs(model: nn.Module, inputs: tuple) -> Any:
    """Run the model once; a failure here is the inputs' (or the model's) fault, not the tracer's."""
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        shapes = [tuple(v.shape) for v in pytree.tree_leaves(inputs) if isinstance(v, torch.Tensor)]
        raise InputError(
            f"{type(model).__name__} fails on the example inputs (tensor shapes {shapes}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _register_dataclasses(out: Any) -> None:
    """Let torch.export flatten dataclass outputs the user did not register as pytree nodes."""
    for v in [out] + (list(out) if isinstance(out, (tuple, list)) else []):
        cls = type(v)
        if dataclasses.is_dataclass(v) and cls not in pytree.SUPPORTED_NODES:
            torch.export.register_dataclass(cls)


def _batch2(inputs: tuple) -> tuple:
    return pytree.tree_map(
        lambda v: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1 else v, inputs)


def _dynamic_spec(inputs: tuple) -> Any:
    return pytree.tree_map(
        lambda v: {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None, inputs)


def _where(e: BaseException, model: nn.Module) -> str:
    """The user's source line (or op) a tracing failure points at."""
    text = str(e)
    m = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', text)
    user = [f for f in m if "/torch/" not in f[0]]
    if user:
        f = user[-1]
        return f"{f[0]}:{f[1]} in {f[2]}: {f[3].strip()}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename
              and "fxadapt" not in f.filename]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    op = re.search(r"(aten\.\w+(?:\.\w+)?)", text)
    return op.group(1) if op else type(model).__name__


def export(model: nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch axis, falling back to static shapes."""
    try:
        return torch.export.export(model, _batch2(inputs), dynamic_shapes=_dynamic_spec(inputs), strict=False)
    except Exception:  # noqa: BLE001 - retried statically; that error is the one reported
        pass
    try:
        return torch.export.export(model, inputs, strict=False)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"cannot capture {type(model).__name__} to an ATen graph: {type(e).__name__}: {first}\n"
            f"  at {_where(e, model)}") from e


def _first_names(gm: GraphModule) -> None:
    """A tensor shared under several names (a module reused in two places) is read under its first name, as
    ``named_parameters()`` lists it: one name per tensor, so the analysis sees every use of a tied weight."""
    first: dict[int, str] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        first.setdefault(id(t), name)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                t = gm.get_parameter(node.target)
            except AttributeError:
                try:
                    t = gm.get_buffer(node.target)
                except AttributeError:
                    continue
            node.target = first.get(id(t), node.target)


def capture(model: nn.Module, example_inputs: Any) -> GraphModule:
    """Lift ``model`` to a trainable ATen-level ``GraphModule`` (see module docstring)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    work = copy.deepcopy(model).eval()
    out = check_runs(work, inputs)
    _register_dataclasses(out)
    ep = export(work, inputs)
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    _first_names(gm)
    for node in graph.nodes:
        trace = node.meta.get("stack_trace")
        if trace:
            node.meta[meta.SOURCE] = trace.strip().splitlines()[-1].strip()
    result = lift_modules(gm, LiftConfig(origin=work)).graph_module
    result.graph.lint()
    result.recompile()
    result.train(model.training)
    batch = next((v.shape[0] for v in pytree.tree_leaves(inputs) if isinstance(v, torch.Tensor) and v.dim()), 1)
    result.meta["fxadapt.batch"] = int(batch)
    return result
