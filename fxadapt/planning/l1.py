"""Per-position L1 mass of a weight along one axis, in bounded memory.

    l1(W, axis)[i] = sum_{j: j_axis = i} |W_j| / (W.numel() / W.shape[axis])      (float64 numpy)

``W.abs().float().sum(other)`` holds two full-size temporaries (the absolute values, then their float32
copy: 3x a bfloat16 embedding of 128256x2048, 1.5 GiB, the data-free plan's whole peak on a Llama); a tensor
above ``ONE_SHOT`` elements is summed in slices of ~``SLICE`` elements along its first axis instead, each
slice's absolute values alone in memory (~24 MiB): one float32 buffer reused for every slice, each slice's
sums written into a preallocated result (fresh 16 MiB slices between small kept sums fragment glibc's heap:
~1 GiB held on that embedding). Smaller tensors take the one-shot path (bit-for-bit the same scores as
before). A ``Scratch`` shared by the calls of one plan holds that path's float32 copy in one buffer reused for
every weight (a fresh 64 MiB copy of each MLP matrix is a fresh mapping whose every page faults: ~2x the
copy itself); the copy has the weight's (contiguous) shape, so its sums are the same bits.

>>> import torch
>>> w = torch.arange(12.0).reshape(3, 4) - 6
>>> l1(w, 0).tolist(), l1(w, 1, one_shot=1).tolist() == l1(w, 1).tolist()
([4.5, 1.0, 3.5], True)
"""

from __future__ import annotations

import numpy as np
import torch

ONE_SHOT = 1 << 26   # elements (256 MiB of float32) summed at once; a larger tensor goes slice by slice
SLICE = 1 << 22      # elements a slice holds (16 MiB of float32)


class Scratch:
    """A float32 buffer reused across ``l1`` calls (grown to the largest one-shot weight; see the module
    docstring); drop it to free it."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.float32)

    def abs32(self, w: torch.Tensor) -> torch.Tensor:
        """``_abs32(w)`` in the buffer (a contiguous real CPU tensor; others get a fresh copy)."""
        if not (w.device.type == "cpu" and w.is_contiguous() and w.is_floating_point()):
            return _abs32(w)
        if self.buf.numel() < w.numel():
            self.buf = torch.empty(w.numel(), dtype=torch.float32)
        return self.buf[:w.numel()].view(w.shape).copy_(w).abs_()


def l1(w: torch.Tensor, axis: int, one_shot: int = ONE_SHOT, scratch: Scratch | None = None) -> np.ndarray:
    """Mean |w| per position along ``axis`` (see the module docstring)."""
    w = w.detach()
    other = [d for d in range(w.dim()) if d != axis]
    if not other:
        return w.abs().float().double().numpy()
    scale = max(1, w.numel() // w.shape[axis])
    if w.numel() <= one_shot or w.shape[0] < 2:
        a = _abs32(w) if scratch is None or w.numel() > one_shot else scratch.abs32(w)
        return (a.sum(other) / scale).double().numpy()
    rows = max(1, min(SLICE, one_shot) // max(1, w[0].numel()))
    chunks = w.split(rows, dim=0)
    buf = torch.empty(rows * w[0].numel(), dtype=torch.float32)   # one slice buffer, reused
    if axis == 0:
        total = torch.empty(w.shape[0], dtype=torch.float32)
        outs = total.split(rows)
    else:
        sums = torch.empty(len(chunks), w.shape[axis], dtype=torch.float32)
        outs = list(sums)
    for c, out in zip(chunks, outs):
        torch.sum(buf[:c.numel()].view(c.shape).copy_(c).abs_(), other, out=out)
    return ((total if axis == 0 else sums.sum(0)) / scale).double().numpy()


def _abs32(w: torch.Tensor) -> torch.Tensor:
    """``w.abs().float()`` with one temporary: a float32 copy, made absolute in place (exact either way)."""
    return w.to(torch.float32, copy=True).abs_()
