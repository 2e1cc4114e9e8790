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
from fxadapt.passes.lift_modules import AtenCall
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from fxadapt import meta
from fxadapt.ir.channels import ParamRef

FOLDABLE = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True)
class FoldConfig:
    copy: bool = True   # work on a deep copy (the default) or in place


def fold_bn(gm: GraphModule, cfg: FoldConfig = FoldConfig()) -> PassResult:
    """Fold every eligible BatchNorm into its producer; returns how many were folded in ``gm.meta``."""
    gm = copy.deepcopy(gm) if cfg.copy else gm
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0] if node.args else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
            continue
        if getattr(src, "op", None) != "call_module" or len(src.users) != 1:
            continue
        layer = gm.get_submodule(src.target)
        if not isinstance(layer, FOLDABLE):
            continue
        _fold(layer, bn)
        _note_bias(src)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    if folded:
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    gm.meta["fxadapt.folded_bn"] = folded
    return PassResult(gm, folded > 0)


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    w = layer.weight
    s = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed:
        g = layer.groups
        view = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        scale = s.view(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (view * scale).view_as(w)
    else:
        new_w = w * s.view(-1, *([1] * (w.dim() - 1)))
    b = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    layer.weight = nn.Parameter(new_w.detach().clone(), requires_grad=w.requires_grad)
    layer.bias = nn.Parameter(((b - bn.running_mean) * s + shift).detach().clone())


def _note_bias(node) -> None:
    """The lifted call now has a bias: keep its ATen template in sync for later analyses."""
    tpl = node.meta.get(meta.ATEN)
    if isinstance(tpl, AtenCall) and len(tpl.args) > 2 and tpl.args[2] is None:
        args = list(tpl.args)
        args[2] = ParamRef(f"{node.target}.bias")
        node.meta[meta.ATEN] = AtenCall(tpl.op, tuple(args))
