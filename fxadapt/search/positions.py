"""The losses the importance scores and distillation read, over the positions that count.

A batch with an ``attention_mask`` (Hugging Face's, 1: a token, 0: padding) weighs position ``t`` of sample
``i`` by ``w_it = attention_mask[i, t]``; without one (or with no zero in it) every position weighs 1 and the
formulas are the unweighted ones. With the rows ``r = (i, t)`` of an output ``s`` (``(B, T, V)`` logits
flattened to ``(B T, V)``), the original's ``t`` and drawn targets ``y``:

    sample_loss = sum_r w_r CE(s_r, y_r)                 ("mse": sum_r w_r 0.5 |s_r - y_r|^2)
    divergence  = sum_r w_r KL(softmax t_r || softmax s_r)   ("mse": sum_r w_r 0.5 |s_r - t_r|^2)
    distill     = tau^2 sum_r w_r KL_tau(t_r || s_r) / sum_r w_r   ("mse": sum_r w_r mean_c (s - t)^2 / sum w)

An output whose rows are not the batch's positions (a classifier's ``(B, C)``) is not weighted: the model
reads the mask itself. ``site_weights`` gives the same ``w`` for an activation inside the network (its
``(B, ..., T, ...)`` or flattened ``(B T, ...)`` layout), so activation and gradient sums skip padding too.

>>> import torch
>>> s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
>>> w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
>>> apart = divergence(s[:1, :2], t[:1, :2], "kl") + divergence(s[1:, :1], t[1:, :1], "kl")
>>> abs(divergence(s, t, "kl", w) - apart) < 1e-4
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F


def position_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as float ``(B, T)`` weights, or None (no mask, or nothing padded)."""
    inputs = getattr(batch, "inputs", None)
    mask = getattr(inputs, "kwargs", {}).get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return None
    return (mask != 0).float()


def row_weights(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``w`` per row of ``out.reshape(-1, out.shape[-1])`` where ``out`` is ``(B, T, ...)`` per position."""
    if mask is None or out.dim() < 3 or tuple(out.shape[:2]) != tuple(mask.shape):
        return None
    return mask.to(out.device).repeat_interleave(out[0, 0].numel() // out.shape[-1], 1).reshape(-1)


def site_weights(t: torch.Tensor, axis: int, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``w`` broadcast over activation ``t`` (channels on ``axis``): its first non-channel axis of length
    ``T`` after the batch axis, or its rows when they are ``(sample, position)`` flattened; else None."""
    if mask is None:
        return None
    b, n = mask.shape
    if t.dim() >= 1 and t.shape[0] == b * n:
        return mask.to(t.device).reshape(-1, *([1] * (t.dim() - 1)))
    if t.dim() >= 2 and t.shape[0] == b:
        for d in range(1, t.dim()):
            if d != axis and t.shape[d] == n:
                shape = [1] * t.dim()
                shape[0], shape[d] = b, n
                return mask.to(t.device).view(shape)
    return None


def drawn_targets(t_out: torch.Tensor, loss: str, gen: torch.Generator) -> torch.Tensor:
    """Targets drawn from the original's predictive distribution: a class per position (``"kl"``) or the
    output plus unit Gaussian noise (``"mse"``); ``gen`` makes the draw reproducible."""
    if loss == "mse":
        return t_out + torch.randn(t_out.shape, generator=gen).to(t_out)
    p = torch.softmax(t_out.reshape(-1, t_out.shape[-1]).double().cpu(), -1)
    return torch.multinomial(p, 1, generator=gen).view(t_out.shape[:-1]).to(t_out.device)


def sample_loss(out: torch.Tensor, y: torch.Tensor, loss: str, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Sum over samples (and the positions that count) of the per-sample loss against drawn targets."""
    w = row_weights(out, mask)
    if loss == "mse":
        if w is None:
            return 0.5 * (out - y).pow(2).sum()
        return 0.5 * ((out - y).pow(2).reshape(-1, out.shape[-1]).sum(-1) * w).sum()
    if w is None:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
    return (F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none") * w).sum()


def divergence(out: torch.Tensor, t_out: torch.Tensor, loss: str, mask: torch.Tensor | None = None) -> float:
    """``sum_i KL(t_i || s_i)`` over samples (and the positions that count), or ``sum_i 0.5 |s_i - t_i|^2``
    (``"mse"``)."""
    w = row_weights(out, mask)
    if loss == "mse":
        if w is None:
            return float(0.5 * (out - t_out).pow(2).sum())
        return float(0.5 * ((out - t_out).pow(2).reshape(-1, out.shape[-1]).sum(-1) * w).sum())
    lt, ls = (F.log_softmax(v.reshape(-1, v.shape[-1]).float(), -1) for v in (t_out, out))
    if w is None:
        return float((lt.exp() * (lt - ls)).sum())
    return float(((lt.exp() * (lt - ls)).sum(-1) * w).sum())


def distill(out: torch.Tensor, t_out: torch.Tensor, loss: str, tau: float, mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    """The distillation loss to the original (module docstring): mean over the positions that count."""
    w = row_weights(out, mask)
    if loss == "mse":
        if w is None:
            return F.mse_loss(out, t_out)
        return ((out - t_out).pow(2).reshape(-1, out.shape[-1]).mean(-1) * w).sum() / w.sum()
    ls, lt = (F.log_softmax(v.reshape(-1, v.shape[-1]) / tau, -1) for v in (out, t_out))
    if w is None:
        return tau * tau * F.kl_div(ls, lt, log_target=True, reduction="batchmean")
    return tau * tau * (F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1) * w).sum() / w.sum()
