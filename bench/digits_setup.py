"""Data, base model and baselines of the digits quality benchmark (see bench/quality_digits.py).

Protocol (fixed): scikit-learn's bundled digits (1797 8x8 images, 10 classes), split with a fixed
permutation into 500 train / 300 val / 997 test; images upsampled to 32x32, repeated to 3 channels,
standardised, and Gaussian noise (sigma ``NOISE``) added once with a fixed seed to train/val/test alike,
which keeps accuracies off 100% so methods can be told apart. Base model: pytorchcv's CIFAR ResNet-20
(10 classes), trained from scratch for ``BASE_EPOCHS`` with the shared fine-tuning recipe.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

NOISE = 1.0
SPLIT = (500, 300)
BASE_EPOCHS = 30


def digits_data(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    x = (x - x.mean()) / x.std()
    g = torch.Generator().manual_seed(seed)
    x = x + NOISE * torch.randn(x.shape, generator=g)
    perm = torch.randperm(len(x), generator=g)
    a, b = SPLIT
    parts = {"train": perm[:a], "val": perm[a:a + b], "test": perm[a + b:]}
    return {k: (x[idx], y[idx]) for k, idx in parts.items()}


def base_model() -> nn.Module:
    from pytorchcv.models.resnet_cifar import resnet20_cifar10

    torch.manual_seed(0)
    return resnet20_cifar10(num_classes=10)


def tp_prune(model: nn.Module, x: torch.Tensor, target_macs: float, global_pruning: bool) -> nn.Module:
    """Torch-Pruning magnitude pruning at the ratio (bisection) whose result meets ``target_macs``."""
    import copy

    import torch_pruning as tp

    from fxadapt.analysis.count import count_macs

    def prune(ratio: float) -> nn.Module:
        m = copy.deepcopy(model).eval()
        head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=head,
                                           global_pruning=global_pruning)
        pruner.step()
        return m

    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = prune(mid)
        if count_macs(m, (x,)) <= target_macs:
            best, hi = m, mid
        else:
            lo = mid
    return best if best is not None else prune(hi)


def uniform_scaled(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    """Every group scaled by the same factor, keeping the *first* channels (no importance criterion)."""
    import numpy as np
    from fxadapt.passes.materialize import materialize

    import fxadapt
    from fxadapt.planning.budget import solve_widths
    from fxadapt.planning.plan import make_plan

    a = fxadapt.analyze(model, (x,))
    units = solve_widths(a, ratio * a.macs())
    scores = {g.id: -np.arange(g.units, dtype=float) for g in a.groups}
    return materialize(a.gm, make_plan(a, units, scores=scores)).graph_module
