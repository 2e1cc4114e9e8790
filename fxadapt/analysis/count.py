"""Independent MAC count of a model run: ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).

This is the *independent* check that ``transform`` verifies budgets with; it shares no code with the cost
model (``fxadapt.analysis.cost``), which is derived from the op registry.

Example:
    >>> import torch
    >>> count_macs(torch.nn.Linear(4, 3), (torch.randn(2, 4),))
    24.0
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, inputs: tuple) -> float:
    """MACs of one forward pass in eval mode, counted by ``FlopCounterMode`` (FLOPs / 2)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was)
    return counter.get_total_flops() / 2
