"""The op registry (``OPS``), filled by the op families imported below: layers (conv, linear, norms,
embedding), pointwise (activations, broadcasting arithmetic, reductions, pooling), reshape (views,
permutes, shuffles), indexing (cat, split, slice, matmul), attention (sdpa) and routing (topk, sort, index,
grouped expert matmuls).

>>> import torch
>>> from fxadapt.ops import OPS
>>> OPS[torch.ops.aten.conv2d.default].kind
'produces'
"""

from fxadapt.ops import attention, einsum, grouped, indexing, layers, pointwise, recurrent, reshape, routing  # noqa: F401  (registration)
from fxadapt.ops.core import Blocked, Call, Ctx, RuleRecord
from fxadapt.ops.registry import OPS, Lift, OpSpec, missing_reason, op_of, register, rule, spec_of

__all__ = ["OPS", "OpSpec", "Lift", "Blocked", "Call", "Ctx", "RuleRecord", "register", "rule", "spec_of",
           "op_of", "missing_reason"]
