"""The ATen call a lifted ``call_module`` node stands for (stored in ``node.meta[meta.ATEN]``).

>>> from fxadapt.ir.channels import ParamRef
>>> AtenCall("conv", (Input(0), ParamRef("c.weight"))).params()
(ParamRef(target='c.weight'),)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.fx import Node

from fxadapt.ir.channels import ParamRef


@dataclass(frozen=True)
class Input:
    """Placeholder in an ``AtenCall`` template: the call's ``i``-th activation argument."""

    i: int


@dataclass(frozen=True)
class AtenCall:
    """The ATen call a lifted module computes, with parameters as ``ParamRef`` and activations as
    ``Input``."""

    op: object
    args: tuple

    def bind(self, node: Node) -> tuple:
        return tuple(node.args[a.i] if isinstance(a, Input) else a for a in self.args)

    def params(self) -> tuple[ParamRef, ...]:
        return tuple(a for a in self.args if isinstance(a, ParamRef))

    def replace(self, index: int, value: Any) -> AtenCall:
        args = list(self.args)
        args[index] = value
        return AtenCall(self.op, tuple(args))
