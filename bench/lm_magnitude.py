"""The Torch-Pruning LLM recipe by hand, for HF GPT-2 (bench/bench_lm_quality.py's magnitude baseline).

TP 1.6 has no pruner for HF's ``Conv1D`` (``MetaPruner`` with ``num_heads``/``prune_num_heads=True`` on this
model runs and removes nothing), so: per layer, whole heads ranked by the L1 norm of their q/k/v columns and
output-projection rows, MLP neurons by the L1 norm of their c_fc column and c_proj row; one uniform ratio
``p`` for both (heads kept: ``max(1, round(H (1 - p)))``), found by bisection to a MACs target.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxadapt.analysis.count import count_macs


def _conv1d(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(weight.shape[1], weight.shape[0])
    layer.weight.data, layer.bias.data = weight.clone(), bias.clone()
    return layer


def _prune_heads(attn: nn.Module, keep: int) -> None:
    """Keep the ``keep`` heads of largest L1 norm (q/k/v columns + c_proj rows); head_dim unchanged."""
    e, hd, h = attn.embed_dim, attn.head_dim, attn.num_heads
    w, p = attn.c_attn.weight, attn.c_proj.weight                     # Conv1D: [in, out]
    cols = torch.arange(3 * e).view(3, h, hd)                           # [q|k|v] x head x head_dim
    score = w.abs()[:, cols].sum(dim=(0, 1, 3)) + p.abs().view(h, hd, e).sum(dim=(1, 2))
    heads = score.topk(keep).indices.sort().values
    kept = cols[:, heads].flatten()
    attn.c_attn = _conv1d(w[:, kept], attn.c_attn.bias[kept])
    rows = cols[0, heads].flatten()
    attn.c_proj = _conv1d(p[rows], attn.c_proj.bias)
    attn.num_heads, attn.split_size = keep, keep * hd


def _prune_mlp(mlp: nn.Module, keep: int) -> None:
    """Keep the ``keep`` neurons of largest L1 norm (c_fc column + c_proj row)."""
    fc, proj = mlp.c_fc.weight, mlp.c_proj.weight
    idx = (fc.abs().sum(0) + proj.abs().sum(1)).topk(keep).indices.sort().values
    mlp.c_fc = _conv1d(fc[:, idx], mlp.c_fc.bias[idx])
    mlp.c_proj = _conv1d(proj[idx], mlp.c_proj.bias)


@torch.no_grad()
def magnitude_prune(model: nn.Module, p: float) -> nn.Module:
    """Uniform ratio ``p`` per layer: heads kept ``max(1, round(H (1 - p)))``, MLP neurons ``round(4E (1 -
    p))``."""
    out = copy.deepcopy(model)
    for block in out.transformer.h:
        h, inner = block.attn.num_heads, block.mlp.c_fc.weight.shape[1]
        _prune_heads(block.attn, max(1, round(h * (1 - p))))
        _prune_mlp(block.mlp, max(1, round(inner * (1 - p))))
    return out


def magnitude_at(model: nn.Module, target: float, ex: dict, iters: int = 30) -> tuple[nn.Module, float]:
    """Bisection on ``p`` (MACs fall with ``p``): the pruned model whose MACs are closest to ``target``."""
    lo, hi = 0.0, 0.99
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_macs(magnitude_prune(model, mid), ex) > target else (lo, mid)
    best = min((lo, hi), key=lambda q: abs(count_macs(magnitude_prune(model, q), ex) - target))
    return magnitude_prune(model, best), best
