"""Cross-check the cost model against torch's own FLOP formulas, node by node, so no op is silently uncosted.

Every ATen call of the graph is replayed once on ``meta`` tensors of its recorded shapes (no data, no
compute) under a dispatch mode that applies torch's own FLOP formulas (``torch.utils.flop_counter.
flop_registry``, what ``FlopCounterMode`` uses) to every kernel the call decomposes into, with attention
routed through the math backend so that scaled-dot-product attention is counted as its two matrix
products. Calls with the same op and argument shapes are replayed once, their meta kernels through the
shape check's dispatch cache (``passes.meta_run.MetaCache``, below the counter: it sees the same calls and
outputs). That count (FLOPs / 2)
is compared with the cost model's term for the same node: a node torch counts and the registry does not
(an op without a cost formula, an unregistered overload) or counts differently is an ``Uncosted`` entry.

Example:
    >>> import torch, fxadapt
    >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), (torch.randn(1, 3, 8, 8),))
    >>> a.uncosted
    ()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, shape_wrapper

from fxadapt.analysis.cost import CostModel
from fxadapt.analysis.count import extra_flops  # the independent count's formulas torch lacks
from fxadapt.analysis.propagate import normalize
from fxadapt.ir.channels import ParamRef
from fxadapt.ops.registry import op_of
from fxadapt.passes.meta_run import MetaCache

REL_TOL = 1e-3


@dataclass(frozen=True)
class Uncosted:
    """A node whose MACs by torch's formulas differ from the cost model's."""

    node: str
    op: str
    torch_macs: float
    model_macs: float

    def __str__(self) -> str:
        return (f"{self.node} ({self.op}): torch counts {self.torch_macs:,.0f} MACs, "
                f"the cost model {self.model_macs:,.0f}")


def _meta(node_val, shape):
    if isinstance(node_val, torch.Tensor) and isinstance(shape, tuple):
        return torch.empty(shape, dtype=node_val.dtype, device="meta")
    return node_val


def _args(node: Node, shapes: dict, tensors: dict):
    """Call arguments with activations and parameters as meta tensors (None if one is not a tensor)."""
    call = normalize(node)
    if call is None:
        return None
    bad = []

    def conv(x):
        if isinstance(x, Node):
            val = x.meta.get("val")
            if not isinstance(val, torch.Tensor):
                bad.append(x)
                return None
            return _meta(val, shapes.get(x.name))
        if isinstance(x, ParamRef):
            t = tensors[x.target]
            return torch.empty(t.shape, dtype=t.dtype, device="meta")
        return x

    args = torch.fx.node.map_aggregate(call.args, conv)
    kwargs = torch.fx.node.map_aggregate(call.kwargs, conv)
    return None if bad else (call.op, args, kwargs)


class _Flops(TorchDispatchMode):
    """Sum of torch's FLOP formulas over the kernels run inside it."""

    total = 0

    def __init__(self):
        super().__init__()
        self.registry = {**flop_registry, **{k: shape_wrapper(v) for k, v in extra_flops().items()
                                             if k not in flop_registry}}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func.overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)

        return out


def _signature(bound) -> tuple:
    leaves = torch.utils._pytree.tree_leaves((bound[1], bound[2]))
    return (bound[0],
            ) + tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v) for v in leaves)


def torch_macs(gm: GraphModule, shapes: dict) -> dict[str, float]:
    """MACs of every ATen node by torch's FLOP formulas on meta tensors (nodes it cannot replay are left
    out)."""
    out: dict[str, float] = {}
    seen: dict[tuple, float] = {}
    counter = _Flops()
    tensors = {**dict(gm.named_parameters(remove_duplicate=False)),
               **dict(gm.named_buffers(remove_duplicate=False))}
    # the meta kernels memoised below the counter (``passes.meta_run``): it sees the same calls and outputs
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad(), MetaCache(), counter:
        for node in gm.graph.nodes:
            if not isinstance(op_of(node), torch._ops.OpOverload):
                continue
            bound = _args(node, shapes, tensors)
            if bound is None:
                continue
            key = _signature(bound)
            if key not in seen:
                before = counter.total
                try:
                    bound[0](*bound[1], **bound[2])
                    seen[key] = (counter.total - before) / 2
                except Exception:  # noqa: BLE001 - an op that cannot run on meta tensors is not checked here
                    seen[key] = 0.0
            if seen[key]:
                out[node.name] = seen[key]
    return out


def crosscheck(gm: GraphModule, shapes: dict, cost: CostModel) -> tuple[Uncosted, ...]:
    """Nodes where torch's count and the cost model's (at the original widths) disagree."""
    ours: dict[str, float] = {}
    full = cost._n(None)
    for t in cost.macs_terms:
        ours[t.node] = ours.get(t.node, 0.0) + t.value(full)
    theirs = torch_macs(gm, shapes)
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    bad = []
    for name in sorted(set(ours) | set(theirs), key=order.__getitem__):
        a, b = theirs.get(name, 0.0), ours.get(name, 0.0)
        if abs(a - b) > REL_TOL * max(a, b):
            bad.append(Uncosted(name, str(op_of(nodes[name])), a, b))
    return tuple(bad)
