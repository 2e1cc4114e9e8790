"""Re-estimate BatchNorm running statistics on a few batches (no gradient steps).

After slicing, a BatchNorm's running mean and variance still describe the *original* network's
activations; the pruned network's differ, which is why pruned models sit near chance before fine-tuning.
For each BN, ``momentum = None`` makes the running statistics a cumulative average over the batches seen:
``mu = mean_k mu_k``, ``var = mean_k var_k`` (unbiased), after resetting them. Only BN buffers change.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval()
>>> x = torch.randn(32, 3, 4, 4) * 3 + 1
>>> recalibrate_bn(m, (x, torch.zeros(32)), batches=2, batch_size=16)
2
>>> bool((m[1].running_mean - m[0](x).mean((0, 2, 3))).abs().max() < 1e-4), m.training
(True, False)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxadapt import dist
from fxadapt.train.data import Batches


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Any, batches: int = 20, batch_size: int = 64, seed: int = 0,
                   device: str = "cpu") -> int:
    """Reset and re-estimate every BatchNorm's statistics on ``batches`` batches of ``data``; returns how
    many batches were used (0 when the model has no BatchNorm). The model's train/eval mode is kept."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    saved = [(m, m.momentum) for m in norms]
    was = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    src = Batches(data, batch_size, seed)
    n = min(batches, max(1, len(src) // min(batch_size, len(src))))
    model.train()
    try:
        for k in range(n):
            src.get(k, device).call(model)
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    dist.broadcast_state(model, dist.setup(device))  # under torchrun: every rank keeps rank 0's statistics
    return n
