"""Pass: run the graph on example inputs, record every node's output shape in ``meta['val']``.

Shapes are stored as ``meta``-device tensors (no data), so analyses of a rewritten graph see its real
shapes. A graph that no longer runs fails here, naming the node: this is the shape check run after every
pipeline step. Example inputs take every form ``fxadapt.ir.inputs.as_inputs`` accepts (an ``Inputs``,
keyword inputs included); they are flattened in the order of the graph's input spec.

Example:
    >>> import torch
    >>> from fxadapt import capture
    >>> gm = capture(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
    >>> shape_check(gm, (torch.randn(3, 4),)).modified
    False
    >>> gm = capture(torch.nn.Linear(4, 2), {"input": torch.randn(1, 4)})
    >>> shape_check(gm, {"input": torch.randn(5, 4)}).graph_module.meta["fxadapt.batch"]
    5
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from fxadapt.passes.meta_run import run_on_meta
from torch.fx import GraphModule, Interpreter
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree

from fxadapt import meta
from fxadapt.errors import (
    ShapeCheckError,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.ir.inputs import Inputs, as_inputs


def _meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_meta(x) for x in v) if isinstance(v, list) else tuple(_meta(x) for x in v)
    return v


class _Recorder(Interpreter):
    def run_node(self, n):
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001
            raise ShapeCheckError(f"rewritten graph fails at node {n.name} ({n.target}): {e}") from e
        if n.op != "output":
            n.meta["val"] = _meta(out)
        return out


def _in_spec(gm: GraphModule) -> Any:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return info.in_spec if info is not None and info.in_spec is not None else getattr(gm, "_in_spec", None)


def flat_inputs(gm: GraphModule, example_inputs: Any) -> list:
    """The graph's placeholder values: ``(args, kwargs)`` flattened by its input spec (keywords in the
    spec's order); positional inputs as they are for a graph without one (keywords bound by name)."""
    inputs = as_inputs(example_inputs)
    spec = _in_spec(gm)
    if spec is None:
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        return [*inputs.args, *(inputs.kwargs[k] for k in names[len(inputs.args):] if k in inputs.kwargs)]
    kwargs = inputs.kwargs
    children = spec.children_specs if spec.type is tuple else []
    if len(children) == 2 and children[1].type is dict and set(children[1].context) == set(kwargs):
        kwargs = {k: kwargs[k] for k in children[1].context}
    return pytree.tree_leaves((tuple(inputs.args), kwargs))


def shape_check(gm: GraphModule, example_inputs: Inputs | tuple | Any, fake: bool = False) -> PassResult:
    """Run ``gm`` once (no grad, eval mode restored afterwards) and refresh ``meta['val']``.

    ``fake=True`` runs it on ``meta`` tensors (``passes.meta_run``), or where that cannot run, under
    ``FakeTensorMode``: shapes and dtypes propagate exactly, nothing is computed (what the pass runner uses
    after every step)."""
    inputs = as_inputs(example_inputs)
    was_training = gm.training
    gm.eval()
    try:
        if not (fake and run_on_meta(gm, flat_inputs(gm, inputs))):   # meta: the same shapes, ~10x cheaper
            with torch.no_grad(), _fake_mode() if fake else contextlib.nullcontext() as mode:
                flat = flat_inputs(gm, inputs)
                if mode is not None:
                    flat = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in flat]
                _Recorder(gm).run(*flat, enable_io_processing=False)
    except ShapeCheckError as e:   # a value read back (``item()`` on a count): shapes need the real run
        if not fake or type(e.__cause__).__name__ != "DataDependentOutputException":
            raise
        with torch.no_grad():
            _Recorder(gm).run(*flat_inputs(gm, inputs), enable_io_processing=False)
    finally:
        gm.train(was_training)
    gm.meta[meta.BATCH] = inputs.batch
    return PassResult(gm, False)


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)
