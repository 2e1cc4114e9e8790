"""Pass: run the graph on example inputs, record every node's output shape in ``meta['val']``.

Shapes are stored as ``meta``-device tensors (no data), so analyses of a rewritten graph see its real
shapes. A graph that no longer runs fails here, naming the node: this is the shape check run after every
pipeline step.

Example:
    >>> import torch
    >>> from fxadapt import capture
    >>> gm = capture(torch.nn.Linear(4, 2), (torch.randn(1, 4),))
    >>> shape_check(gm, (torch.randn(3, 4),)).modified
    False
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Interpreter
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils import _pytree as pytree

from fxadapt.errors import FxAdaptError


class ShapeCheckError(FxAdaptError):
    """A rewritten graph failed to run (the message names the node)."""


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


def flat_inputs(gm: GraphModule, example_inputs: tuple) -> list:
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(example_inputs)
    leaves, _ = pytree.tree_flatten((tuple(example_inputs), {}))
    return leaves


def shape_check(gm: GraphModule, example_inputs: tuple) -> PassResult:
    """Run ``gm`` once (no grad, eval mode restored afterwards) and refresh ``meta['val']``."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            _Recorder(gm).run(*flat_inputs(gm, example_inputs))
    finally:
        gm.train(was_training)
    batch = next((v.shape[0] for v in pytree.tree_leaves(example_inputs) if isinstance(v, torch.Tensor) and v.dim()), 1)
    gm.meta["fxadapt.batch"] = int(batch)
    return PassResult(gm, False)
