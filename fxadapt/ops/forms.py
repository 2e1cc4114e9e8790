"""Linear forms in the kept units: the size of one sliced tensor axis, ``const + sum_g coef_g * n_g`` (``n_g``
the kept units of group ``g``). The cost model (``fxadapt.analysis.cost``) multiplies them into MACs and
parameter counts; the latency keys (``fxadapt.ops.latency_keys``) hold them where a layer's shape depends on
the adapted widths.

>>> LinearForm(1.0, ((0, 2.0),)).value({0: 3})
7.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, overload


@dataclass(frozen=True)
class LinearForm:
    """``const + sum(coef * n[g])``: the size of one tensor axis as a function of kept units."""

    const: float
    coefs: tuple[tuple[int, float], ...] = ()

    def value(self, n: Mapping[int, Any]) -> float:
        return self.const + sum(c * n[g] for g, c in self.coefs)

    def __add__(self, other: LinearForm) -> LinearForm:
        merged: dict[int, float] = dict(self.coefs)
        for g, c in other.coefs:
            merged[g] = merged.get(g, 0.0) + c
        return LinearForm(self.const + other.const, tuple(sorted(merged.items())))


class CostView(Protocol):
    """What an op's cost formula (``OpSpec.cost``) and latency key read: the node, shapes and tracks, and axis
    sizes as ``LinearForm``s. ``fxadapt.analysis.cost_build.CostCtx`` implements it; the op registry only
    names the shape, so ``ops`` never imports ``analysis``."""

    node: Any                                   # the torch.fx node being costed
    ctx: Any                                    # the propagation context (``fxadapt.ops.core.Ctx``)
    sites: dict                                 # (parameter name, axis) -> channel labels
    form: Callable[..., LinearForm]             # (labels, size) -> the size as a form

    @property
    def out_shape(self) -> Any: ...

    def shape(self, x: Any) -> Any: ...

    def track(self, x: Any) -> Any: ...

    def const(self, size: float) -> LinearForm: ...

    @overload
    def axis_form(self, t: Any, axis: int, size: int, default: Literal[True]) -> LinearForm: ...

    @overload
    def axis_form(self, t: Any, axis: int, size: int, default: bool = False) -> LinearForm | None: ...

    def weight_factors(self, ref: Any) -> list[LinearForm]: ...

    def activation_factors(self, t: Any, shape: tuple) -> tuple[float, list[LinearForm]]: ...
