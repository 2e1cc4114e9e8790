"""Convolution weights computed per output channel from a parameter: weight standardisation.

BiT's ``WeightStandardizedConv2d`` and timm's ``StdConv2d`` / ``ScaledStdConv2d`` convolve with

    W'[o] = g_o * (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)

computed at run time as ``batch_norm(W.reshape(1, O, -1), None, None, g, training=True).reshape_as(W)``.
Every output channel is standardised alone (statistics over its own ``I/groups * k...`` entries), so slicing
output channels commutes with it: ``W'[keep] = f(W[keep])``. The convolution is then ruled as if it read
``W`` itself (``fxadapt.ops.layers``), plus:

- the chain's explicit size lists hold ``O`` (``reshape(1, O, -1)``): a ``shape_arg`` site each;
- a per-channel gain ``g`` of the norm is sliced with the output channels (``norm`` site);
- the input channels enter each output channel's statistics (a ``mix`` site at the norm): dropping an input
  channel re-standardises the rest (not exact, like pruning under a layer norm), and new input channels,
  even with zero weights, shift the mean and variance, so growth is not function-preserving. A depthwise
  convolution's statistics are over its kernel only: nothing mixes.

The chain is followed from the convolution's weight back to one parameter through views that keep the
output channels leading (the first axis of size other than 1 has size ``O``), casts and copies, and at most
one batch/instance norm over that axis with batch statistics (no running statistics). Anything else is
named in the reason the channels freeze with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.fx import Node

from fxadapt.ir.channels import ParamRef, Site
from fxadapt.ops.core import Ctx, aten_ops
from fxadapt.ops.norm_params import norm_param_site

_SIZED = aten_ops("view.default", "reshape.default", "_unsafe_view.default")
_VIEWS = (*_SIZED, *aten_ops("reshape_as.default", "view_as.default", "flatten.using_ints",
                             "unsqueeze.default", "squeeze.dim", "squeeze.dims", "squeeze.default"))
_COPIES = aten_ops("clone.default", "contiguous.default", "_to_copy.default", "to.dtype", "alias.default",
                   "detach.default")
_NORMS = aten_ops("batch_norm.default", "instance_norm.default")
_MAX_CHAIN = 8


@dataclass(frozen=True)
class Standardised:
    """A weight computed per output channel from ``param`` (module docstring): ``sizes`` are the chain's
    ``(view node, entry)`` holding ``O``; ``norm`` the standardising norm node (None: views only)."""

    param: ParamRef
    sizes: tuple[tuple[str, int], ...]
    norm: Node | None


def standardised(w: Any, shape: Callable[[Any], Any], out_axis: int = 0) -> Standardised | str | None:
    """What computes the convolution weight ``w`` (a node): a ``Standardised`` chain, or the reason it is
    not one (naming the op); None when ``w`` is not a node. ``shape``: ``Ctx.shape``; ``out_axis``: the
    weight axis of the output channels (1 for a transposed convolution: not standardised per channel)."""
    if not isinstance(w, Node):
        return None
    if out_axis != 0:
        return "a transposed convolution's weight computed at run time"
    chain: list[Node] = []
    node = w
    for _ in range(_MAX_CHAIN):
        if node.op == "get_attr":
            return _check(chain, ParamRef(str(node.target)), shape)
        op = node.target
        if node.op != "call_function" or op not in (*_VIEWS, *_COPIES, *_NORMS) \
                or not node.args or not isinstance(node.args[0], Node):
            return f"{node.name} ({_name(op)}) is not a per-output-channel op of a parameter"
        chain.append(node)
        node = node.args[0]
    return f"{w.name} is computed by a chain of more than {_MAX_CHAIN} ops"


def _check(chain: list[Node], param: ParamRef, shape) -> Standardised | str:
    o = shape(param)[0]
    norms = [n for n in chain if n.target in _NORMS]
    if len(norms) > 1:
        return f"{norms[0].name} and {norms[1].name} both normalise the weight"
    sizes = []
    for n in chain:
        s = shape(n)
        lead = next((k for k, d in enumerate(s) if d != 1), None)
        if lead is None or s[lead] != o:
            return f"{n.name} ({_name(n.target)}) merges the output channels with other axes"
        if n.target in _NORMS and not _per_channel(n, lead):
            return f"{n.name} ({_name(n.target)}) normalises with running statistics or across channels"
        size = n.args[1] if n.target in _SIZED else None
        if isinstance(size, (list, tuple)) and isinstance(size[lead], int) and size[lead] != -1:
            sizes.append((n.name, lead))
        other = n.args[1] if n.target in aten_ops("reshape_as.default", "view_as.default") else None
        if isinstance(other, Node) and not (other.op == "get_attr" and str(other.target) == param.target):
            return f"{n.name} ({_name(n.target)}) takes its shape from {other.name}, not from the weight"
    if chain and tuple(shape(chain[0])) != tuple(shape(param)):
        return f"{chain[0].name} does not give back the weight's shape"
    return Standardised(param, tuple(sizes), norms[0] if norms else None)


def _per_channel(norm: Node, lead: int) -> bool:
    """Batch statistics over the channel axis 1, no running statistics (batch_norm's ``training`` or
    instance_norm's ``use_input_stats``, argument 5)."""
    a = norm.args
    stats = len(a) > 5 and bool(a[5])
    return lead == 1 and len(a) > 4 and a[3] is None and a[4] is None and stats


def record(ctx: Ctx, std: Standardised, out: np.ndarray, inputs: np.ndarray | None) -> None:
    """The sites of a standardised weight beyond the convolution's own (module docstring): ``out`` labels
    of the weight's output axis, ``inputs`` those of its input axis when they mix in the statistics."""
    for name, index in std.sizes:
        ctx.ledger.sites.append(Site("shape_arg", np.asarray(out), "shape", name, arg=1, index=index))
    if std.norm is None:
        return
    for idx in (1, 2):   # the norm's per-channel weight (a gain) and bias
        a = std.norm.args[idx] if len(std.norm.args) > idx else None
        ref = ParamRef(str(a.target)) if isinstance(a, Node) and a.op == "get_attr" else a
        norm_param_site(ctx, ref, 0, out, f"weight standardisation {('', 'gain', 'bias')[idx]}")
    if inputs is not None:
        ctx.ledger.sites.append(Site("mix", np.asarray(inputs), "mix", std.norm.name))


def _name(op: Any) -> str:
    return str(getattr(op, "__name__", op))
