"""Pass: fold eval-mode BatchNorm into the preceding conv / linear / transposed conv.

For ``z = BN(y)`` with ``y = W * x + b`` (conv or matmul, channel ``o`` on the output axis) and running
statistics ``mu, var``, affine ``gamma, beta`` (1 and 0 when not affine):

    s_o  = gamma_o / sqrt(var_o + eps)
    W'_o = s_o * W_o            (every weight feeding output channel o)
    b'_o = s_o * (b_o - mu_o) + beta_o

so ``z = W' * x + b'`` exactly (up to float rounding). The output channel of a conv weight ``[O, I/g, k..]``
is axis 0; of a transposed conv weight ``[I, O/g, k..]`` it is axis 1 within each of the ``g`` groups, so
the weight is viewed as ``[g, I/g, O/g, k..]`` and scaled by ``s`` viewed as ``[g, 1, O/g, 1..]``.
Only BNs that read a single-user conv/linear output and track running statistics are folded.

Example:
    >>> import torch
    >>> from fxadapt import capture
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    >>> res = fold_bn(capture(model, (torch.randn(1, 3, 8, 8),)))
    >>> res.modified, [type(m).__name__ for m in res.graph_module.children()]
    (True, ['Conv2d'])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from fxadapt.passes.lift_modules import getattr_path, relift
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxadapt import meta
from fxadapt.ir.channels import ParamRef
from fxadapt.ops.registry import spec_of


@dataclass(frozen=True)
class FoldConfig:
    copy: bool = True   # work on a deep copy (the default) or in place


def fold_bn(gm: GraphModule, cfg: FoldConfig = FoldConfig()) -> PassResult:
    """Fold every eligible BatchNorm into its producer; returns how many were folded in ``gm.meta``."""
    gm = copy.deepcopy(gm) if cfg.copy else gm
    folded = 0
    for node in list(gm.graph.nodes):
        src = node.args[0] if node.args else None
        if not (_is(node, "affine") and isinstance(src, Node) and _is(src, "absorbs")
                and len(src.users) == 1):
            continue
        bn = _norm_tensors(gm, node)
        if bn is None:
            continue
        _fold(gm, src, bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    gm.meta[meta.FOLDED_BN] = folded
    return PassResult(gm, folded > 0)


def _is(node: Node, fold: str) -> bool:
    """A lifted module whose registry entry folds as ``fold`` ("affine": BN; "absorbs": conv/linear)."""
    spec = spec_of(node)
    return node.op == "call_module" and spec is not None and spec.fold == fold


def _norm_tensors(gm: GraphModule, node: Node):
    """``(gamma, beta, mean, var, eps)`` of a lifted batch norm with running statistics (else None)."""
    # batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, ..)
    a = node.meta[meta.ATEN].args
    if not isinstance(a[3], ParamRef) or not isinstance(a[4], ParamRef):
        return None
    get = lambda r: getattr_path(gm, r.target) if isinstance(r, ParamRef) else None  # noqa: E731
    mean, var = getattr_path(gm, a[3].target), getattr_path(gm, a[4].target)
    gamma = get(a[1]) if a[1] is not None else torch.ones_like(var)
    beta = get(a[2]) if a[2] is not None else torch.zeros_like(mean)
    return gamma, beta, mean, var, a[7]


@torch.no_grad()
def _fold(gm: GraphModule, src: Node, bn) -> None:
    gamma, beta, mean, var, eps = bn
    spec, tpl = spec_of(src), src.meta[meta.ATEN]
    assert spec is not None, src.target   # only registered convs and linears are folded into
    w_ref, b_ref = tpl.args[1], tpl.args[2]
    w = getattr_path(gm, w_ref.target)
    s = gamma / torch.sqrt(var + eps)
    if spec.out_axis == 1:  # transposed conv weight [I, O/g, k..]: output channel o is (group, o % (O/g))
        g = tpl.args[6]
        view = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        new_w = (view * s.view(g, 1, w.shape[1], *([1] * (w.dim() - 2)))).view_as(w)
    else:
        new_w = w * s.view(-1, *([1] * (w.dim() - 1)))
    b = getattr_path(gm, b_ref.target) if isinstance(b_ref, ParamRef) else torch.zeros_like(mean)
    path = str(src.target)   # a call_module's target is its dotted name
    module = gm.get_submodule(path)
    module.weight = nn.Parameter(new_w.detach().clone(), requires_grad=w.requires_grad)
    module.bias = nn.Parameter(((b - mean) * s + beta).detach().clone())
    if not isinstance(b_ref, ParamRef):  # the call now has a bias: keep its ATen template in sync
        src.meta[meta.ATEN] = tpl.replace(2, ParamRef(f"{path}.bias"))
    relift(gm, src)
