"""Norm weights and biases the norm reads through element-wise arithmetic on a parameter.

A norm's affine parameters are sliced with the channels it normalises (role ``norm``). Some models pass a
*computed* weight: Nemotron's ``LayerNorm1P`` and VideoPrism call ``layer_norm(x, shape, weight + 1.0, bias)``
(a zero-centred weight); the argument is then ``add(weight, 1.0)``, not the parameter. Such an argument is
followed back through one-tensor element-wise ops with scalar operands (``fxadapt.ops.operands.param_source``)
to the parameter it reads, which is sliced along the axis behind the norm's axis: the element-wise chain keeps
its shape, so the rewritten graph stays valid. A computed argument that reads no parameter that way (a weight
made from activations) cannot be sliced: its channels are frozen *before* any rewrite, with a reason naming
the argument, instead of leaving a tensor at its old size for the shape check to catch.

>>> import torch
>>> torch.ops.aten.add.Tensor in ARITH
True
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.fx import Node

from fxadapt.ir.channels import ParamRef
from fxadapt.ops import operands
from fxadapt.ops.core import Ctx
from fxadapt.ops.pointwise import PARAM_READS as ARITH


def norm_param_site(ctx: Ctx, a: Any, axis: int, labels: np.ndarray, what: str) -> None:
    """A ``norm`` site on the parameter ``a`` is (or reads element-wise) along ``axis``; frozen channels when
    ``a`` is computed from anything else."""
    if a is None or isinstance(a, ParamRef):
        ctx.param_site(a, axis, labels, "norm")
        return
    if not isinstance(a, Node):
        return
    src = operands.param_source(ctx, a, ARITH)
    if src is not None and 0 <= axis < len(src[1]) and src[1][axis] is not None \
            and ctx.shape(src[0])[src[1][axis]] == len(labels):
        ctx.param_site(src[0], src[1][axis], labels, "norm")
        return
    ctx.freeze(labels,
               f"{what} argument {a.name} is computed at run time from a tensor that is not a parameter "
                       f"read element-wise: it cannot be sliced with the channels")
