"""The one op registry: everything fxadapt knows about an ATen op lives in its ``OpSpec``, keyed by the
ATen ``OpOverload`` (or ``operator.getitem`` / symbolic-size arithmetic).

An entry holds
- ``channels``: the channel rule ``(call, ctx) -> Track | tuple | None | Blocked`` (``fxadapt.ops.core``),
  and ``kind``, the one word ``fxadapt inspect`` prints for it;
- ``cost``: the MAC term ``(call, cx) -> (coef, [LinearForm, ...]) | None``, so that
  ``MACs = coef * prod(factors)`` with every factor the size of one axis as a linear form in group widths
  (``fxadapt.ops.costs``);
- ``zero``: ``"preserves"`` when ``f(0) == 0`` (a zeroed residual branch stays zero through it),
  ``"params"`` when zeroing its weight and bias makes its output zero (conv, linear, norms);
- ``lift``: how the call becomes a standard ``nn`` module (``Lift``: builder, activation and parameter
  argument positions) — and is rebuilt after its parameters were sliced;
- ``fold``: ``"absorbs"`` for an op a following per-channel affine folds into (weight axis ``out_axis``
  holds its output channels), ``"affine"`` for the per-channel affine that folds (batch norm);
- ``sums``: ``out = a + b`` (a residual join);
- ``edit``: how the node's own arguments change when the channels it indexes are sliced
  (``(op, args, site, index, val) -> (op, args)``: the op, its schema-ordered arguments, the ``Site``, the
  kept positions and the node's original output value in; the op, possibly another, and its new arguments
  out; ``fxadapt.ops.edits``);
- ``latency_key``: what a latency lookup table is keyed by (``(call, cx) -> tuple``).

Overloads of one op must each be registered (usually in one ``register`` call sharing the entry). An
overload that is missing while a sibling overload is registered is never guessed: ``missing_reason`` says
so, the channels it touches are frozen with that reason and ``analyze`` reports it among the uncosted ops.

Example:
    >>> import torch
    >>> from fxadapt.ops import OPS
    >>> spec = OPS[torch.ops.aten.conv2d.default]
    >>> spec.kind, spec.zero, spec.fold, spec is OPS[torch.ops.aten.conv2d.padding]
    ('produces', 'params', 'absorbs', True)
    >>> missing_reason(torch.ops.aten.add.out)  # doctest: +ELLIPSIS
    'no channel rule for aten.add.out: this overload has no registry entry (registered: Scalar, Tensor)'
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from fxadapt import meta

KINDS = ("produces", "consumes", "passes", "couples", "reindexes", "blocks", "ignores")
ZERO = (None, "preserves", "params")
FOLD = (None, "absorbs", "affine")


@dataclass(frozen=True)
class Lift:
    """How a call becomes an ``nn`` module: ``build(args, tensors) -> nn.Module`` (``args`` schema-complete,
    parameter arguments replaced by their names, activations by their rank; ``tensors`` name -> tensor)."""

    build: Callable
    acts: tuple[int, ...]
    params: tuple[int, ...] = ()


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op (see module docstring)."""

    name: str
    kind: str
    channels: Callable
    cost: Callable | None = None
    zero: str | None = None
    lift: Lift | None = None
    fold: str | None = None
    out_axis: int = 0
    sums: bool = False
    edit: Callable | None = None
    latency_key: Callable | None = None


class _Registry(dict):
    """``OPS``: keyed by ``OpOverload``. An op of another library's namespace exists only once that library is
    imported (``transformers::grouped_mm_fallback``), so its entry is keyed by the overload's name
    (``"transformers.grouped_mm_fallback.default"``) and found from the overload by that name."""

    def get(self, key: Any, default: Any = None) -> Any:
        hit = dict.get(self, key)
        if hit is None and isinstance(key, torch._ops.OpOverload):
            hit = dict.get(self, str(key))
        return default if hit is None else hit

    def __missing__(self, key: Any) -> OpSpec:
        if isinstance(key, torch._ops.OpOverload) and dict.__contains__(self, str(key)):
            return dict.__getitem__(self, str(key))
        raise KeyError(key)

    def __contains__(self, key: Any) -> bool:
        return self.get(key) is not None


OPS: dict[Any, OpSpec] = _Registry()


def register(*targets: Any, **fields: Any) -> OpSpec:
    """Register one entry under every target (the overloads of one op share it); returns the entry."""
    spec = OpSpec(**fields)
    if spec.kind not in KINDS or spec.zero not in ZERO or spec.fold not in FOLD:
        raise ValueError(f"registry entry {spec.name!r}: kind {spec.kind!r} (one of {KINDS}), zero "
                         f"{spec.zero!r} (one of {ZERO}), fold {spec.fold!r} (one of {FOLD})")
    for t in targets:
        if dict.__contains__(OPS, t):
            raise ValueError(f"two registry entries for {t}")
        OPS[t] = spec
    return spec


def rule(*targets: Any, kind: str, name: str | None = None, **fields: Any) -> Callable:
    """Decorator form of ``register``: the decorated function is the channel rule.

    >>> from fxadapt.ops.registry import OPS, rule
    >>> len(OPS) > 250
    True
    """
    def deco(fn: Callable) -> Callable:
        register(*targets, name=name or fn.__name__, kind=kind, channels=fn, **fields)
        return fn

    return deco


def aten_ops(*names: str) -> list:
    """Resolve ``"relu.default"`` style names to overloads, skipping ones this torch build lacks.

    >>> aten_ops("relu.default", "no_such_op.default") == [torch.ops.aten.relu.default]
    True
    """
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(torch.ops.aten, packet, None)
        op = getattr(op, overload or "default", None) if op is not None else None
        if op is not None:
            out.append(op)
    return out


def missing_reason(op: Any) -> str:
    """Why ``op`` has no entry: a missing overload of a registered op is named as such."""
    packet = getattr(op, "overloadpacket", None)
    siblings = sorted(f"{o}" for o in (packet.overloads() if packet is not None else ())
                      if getattr(packet, o, None) in OPS)
    name = op if isinstance(op, torch._ops.OpOverload) else getattr(op, "__name__", str(op))
    if siblings:
        return (f"no channel rule for {name}: this overload has no registry entry "
                f"(registered: {', '.join(siblings)})")
    return f"no channel rule for {name}: no registry entry"


def op_of(node: Node) -> Any:
    """The op a node computes: its target, or for a lifted ``call_module`` the ATen op it stands for."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_module" and meta.ATEN in node.meta:
        return node.meta[meta.ATEN].op
    return None


def spec_of(node: Node) -> OpSpec | None:
    """The registry entry of a node's op (None for placeholders, outputs, attributes, unknown ops)."""
    op = op_of(node)
    return OPS.get(op) if op is not None else None


SYM_ARITH = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
             operator.neg, operator.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
             operator.ge, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not)
