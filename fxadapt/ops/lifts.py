"""How registry entries lift to standard ``nn`` modules (``OpSpec.lift.build``).

A builder gets the call's schema-complete arguments (parameter arguments replaced by their names,
activation arguments by their rank) and a dict name -> tensor, and returns the module computing exactly
that call with those very tensors (``nn.Conv2d`` holding the same weight object, ``nn.BatchNorm2d`` the
same running statistics, ...). The same builder rebuilds a module after its tensors were sliced, so module
attributes (``in_channels``, ``num_features``...) always agree with the tensors.

>>> import torch
>>> w = torch.nn.Parameter(torch.zeros(4, 3, 3, 3))
>>> m = build_conv([3, "w", None, [1, 1], [0, 0], [1, 1], 1], {"w": w})
>>> type(m).__name__, m.in_channels, m.out_channels, m.weight is w
('Conv2d', 3, 4, True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Skip(Exception):
    """Leave the call as a plain ATen call (an argument pattern we do not lift)."""


def _conv(transposed: bool) -> Callable:
    def build(a: list, t: dict) -> nn.Module:
        w, b = t[a[1]], t.get(a[2]) if a[2] is not None else None
        nd = w.dim() - 2
        if transposed:
            cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[nd - 1]
            stride, padding, out_pad, groups, dilation = a[3], a[4], a[5], a[6], a[7]
            m = cls(w.shape[0], w.shape[1] * groups, w.shape[2:], stride, padding, out_pad, groups,
                    b is not None, dilation, device="meta")
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
            stride, padding, dilation, groups = a[3], a[4], a[5], a[6]
            m = cls(w.shape[1] * groups, w.shape[0], w.shape[2:], stride, padding, dilation, groups,
                    b is not None, device="meta")
        m.weight, m.bias = w, b
        return m

    return build


def build_batch_norm(a: list, t: dict) -> nn.Module:
    x_rank = a[0]
    w, b, rm, rv = (t.get(r) if r is not None else None for r in a[1:5])
    if all(v is None for v in (w, b, rm, rv)):   # no tensors: BiT standardises its conv weights
        raise Skip
    n = next(v.shape[0] for v in (w, b, rm, rv) if v is not None)
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x_rank]
    m = cls(n, eps=a[7], momentum=a[6], affine=w is not None, track_running_stats=rm is not None,
            device="meta")
    if w is not None:
        m.weight, m.bias = w, b
    if rm is not None:
        m.running_mean, m.running_var = rm, rv
        m.num_batches_tracked = t.get(("nbt", a[3]), torch.tensor(0, dtype=torch.long))
    return m


def build_linear(a: list, t: dict) -> nn.Module:
    w, b = t[a[1]], t.get(a[2]) if a[2] is not None else None
    m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    m.weight, m.bias = w, b
    return m


def build_layer_norm(a: list, t: dict) -> nn.Module:
    w, b = (t.get(r) if r is not None else None for r in a[2:4])
    m = nn.LayerNorm(a[1], eps=a[4], elementwise_affine=w is not None, bias=b is not None, device="meta")
    if w is not None:
        m.weight = w
    if b is not None:
        m.bias = b
    return m


def build_group_norm(a: list, t: dict) -> nn.Module:
    w, b = (t.get(r) if r is not None else None for r in a[2:4])
    n = w.shape[0] if w is not None else None
    if n is None:
        raise Skip()
    m = nn.GroupNorm(a[1], n, eps=a[4], affine=True, device="meta")
    m.weight, m.bias = w, b
    return m


def build_embedding(a: list, t: dict) -> nn.Module:
    w = t[a[0]]
    m = nn.Embedding(w.shape[0], w.shape[1], padding_idx=a[2] if a[2] != -1 else None, device="meta")
    m.weight = w
    return m


build_conv = _conv(False)
build_conv_transpose = _conv(True)


def _dropout(cls: type) -> Callable:
    def build(a: list, t: dict) -> nn.Module:
        return cls(a[1])

    return build


build_dropout = _dropout(nn.Dropout)
build_feature_dropout = _dropout(nn.Dropout2d)
build_alpha_dropout = _dropout(nn.AlphaDropout)
