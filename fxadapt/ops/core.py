"""What a channel rule sees and records (the ``channels`` field of a registry entry,
``fxadapt.ops.registry``).

A rule is a function ``(call, ctx) -> out``: it returns the output ``Track`` (or a tuple of them for
multi-output ops, or ``None`` when the output carries no channels) and records on ``ctx`` what it learned:
label unions (``ctx.couple``), frozen labels (``ctx.freeze``) and sites to rewrite (``ctx.site``). It may
return ``Blocked(reason)`` instead: every channel flowing into the op is frozen with that reason. Ops
without an entry are blocked the same way — nothing ever defaults to element-wise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from fxadapt.ir.channels import Ledger, ParamRef, Site, Track
from fxadapt.ops.registry import aten_ops, register, rule  # noqa: F401  (re-exported for rule families)


@dataclass(frozen=True)
class Blocked:
    """A rule's refusal, with the reason shown to users."""

    reason: str


@dataclass(frozen=True)
class RuleRecord:
    """What happened at one node (stored in ``node.meta[meta.RULE]``)."""

    rule: str
    kind: str
    blocked: str | None = None


@dataclass(frozen=True)
class Call:
    """A normalized op call: the ATen overload and its arguments bound by schema name.

    Activations are fx ``Node`` objects; parameters and buffers are ``ParamRef``; the rest are constants.
    """

    op: Any
    node: Node
    args: tuple
    kwargs: dict

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)


class Ctx:
    """What a rule sees: tracks and shapes of its inputs, a label allocator and the ledger."""

    def __init__(self, shapes: dict[str, tuple], params: dict[str, torch.Tensor]):
        self.shapes = shapes
        self.params = params
        self.tracks: dict[str, Any] = {}
        self.ledger = Ledger()
        self.fired: Counter = Counter()
        self.node: Node | None = None
        self.ids: dict[str, Any] = {}  # node -> labels whose *positions* its values are (expert ids)
        self.attention = "auto"        # the analysis' attention mode (fxadapt.ops.heads)
        self.zero_axes: dict[tuple[str, int], Any] = {}  # (zeros node, axis) -> labels (ops.operands)

    # --- reading ---------------------------------------------------------------------------------
    def track(self, x: Any) -> Track | None:
        if isinstance(x, Node):
            t = self.tracks.get(x.name)
            return t if isinstance(t, Track) else None
        return None

    def shape(self, x: Any) -> tuple[int, ...] | None:
        if isinstance(x, Node):
            return self.shapes.get(x.name)
        if isinstance(x, ParamRef):
            return tuple(self.params[x.target].shape)
        if isinstance(x, torch.Tensor):
            return tuple(x.shape)
        return None

    def out_shape(self) -> tuple[int, ...] | None:
        return self.shapes.get(self.at())

    def at(self) -> str:
        """The name of the node whose rule is running."""
        assert self.node is not None, "Ctx.at() outside a rule"
        return self.node.name

    # --- recording -------------------------------------------------------------------------------
    def new(self, n: int) -> np.ndarray:
        return self.ledger.uf.new(n)

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        self.ledger.couple(a, b)

    def freeze(self, x: Track | np.ndarray | None, reason: str) -> None:
        if x is None:
            return
        labels = x.labels if isinstance(x, Track) else x
        self.ledger.freeze(np.asarray(labels), f"{self.at()}: {reason}")

    def site(self, kind: str, labels: np.ndarray, role: str, **kw: Any) -> None:
        self.ledger.sites.append(Site(kind, np.asarray(labels).reshape(-1), role, self.at(), **kw))

    def param_site(self, ref: Any, axis: int, labels: np.ndarray, role: str) -> None:
        if isinstance(ref, ParamRef):
            self.site("param", labels, role, ref=ref, axis=axis)

    def freeze_inputs(self, call: Call, reason: str) -> None:
        for a in _flat_nodes(call.args, call.kwargs):
            self.freeze(self.track(a), reason)


def _flat_nodes(args: tuple, kwargs: dict) -> list[Node]:
    out: list[Node] = []
    torch.fx.node.map_arg((args, kwargs), lambda n: out.append(n))
    return out


# ------------------------------------------------------------------------------------------------
# helpers shared by rule families
# ------------------------------------------------------------------------------------------------
def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def axis_labels(ctx: Ctx, t: Track, axis: int) -> np.ndarray:
    """1-D labels along ``axis`` of a track; other tracked axes are unioned away (one space per tensor)."""
    k = t.axes.index(axis)
    lab = np.moveaxis(t.labels, k, -1)
    flat = lab.reshape(-1, lab.shape[-1])
    if flat.shape[0] > 1:
        ctx.couple(flat, flat[:1])
    return flat[0]


def only_axis(ctx: Ctx, t: Track | None, axis: int, what: str) -> np.ndarray | None:
    """Labels of ``t`` along ``axis``; channels tracked on any other axis are frozen (cannot follow)."""
    if t is None:
        return None
    if axis not in t.axes:
        ctx.freeze(t, f"channels on axis {t.axes} reach {what} on another axis")
        return None
    if len(t.axes) > 1:
        return axis_labels(ctx, t, axis)
    return t.labels


_SHAPE_ONLY = aten_ops("squeeze.dim", "squeeze.dims", "squeeze.default", "unsqueeze.default")


def unused(node: Node, limit: int = 64) -> bool:
    """Whether ``node``'s value is thrown away: no chain of its users reaches the graph output or an op
    with a side effect (an in-place write, an assert). Such a value cannot constrain channels: the shapes it
    is computed at only have to agree among themselves (the dropped final state of a chunked scan).
    ``limit``: the most users looked at before answering no."""
    seen, todo = {node}, list(node.users)
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output" or user.is_impure() or len(seen) > limit:
            return False
        todo.extend(user.users)
    return True


def param_behind_squeezes(x: Any, shape: Callable[[Any], tuple[int, ...] | None]) -> Any:
    """``x``, or the parameter a chain of squeeze/unsqueeze calls reads when the chain gives back the
    parameter's own shape (Mamba hands its kernel ``conv1d.weight.squeeze(1)``, which the kernel's fallback
    unsqueezes again): the layer reads that parameter, position for position. ``shape``: ``Ctx.shape``."""
    node = x
    while isinstance(node, Node) and node.op == "call_function" and node.target in _SHAPE_ONLY:
        node = node.args[0]
    if node is x or not (isinstance(node, Node) and node.op == "get_attr"):
        return x
    ref = ParamRef(str(node.target))   # a get_attr's target is its dotted name
    return ref if shape(ref) == shape(x) else x
