"""Sandwich-rule weight steps with in-place distillation (slimmable networks, DMCP), for the supernet.

One weight step accumulates the gradients of three hard sub-networks of the gated supernet, then steps:

    L = CE(f_max(x), y) + KL(p_T(teacher(x)) || p_T(f_min(x))) + KL(p_T(teacher(x)) || p_T(f_rand(x)))

``f_max``: every bin and block on; ``f_min``: only the always-on ``n_min`` units per group and no
removable block; ``f_rand``: bin ``k`` of a group kept with probability ``clamp(a_k)`` given bin ``k-1``
kept (the gate's own Markov chain) and each block with probability ``clamp(b)``, drawn from a generator
seeded by ``(seed, step)`` so every rank and a resumed run draw the same sub-network. The teacher is the
original model (its soft labels at temperature ``T`` = ``SearchConfig.kd_temperature``). The gates are set
to the hard values only for these forwards and restored afterwards; they receive no gradient here.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fxadapt import dist
from fxadapt.train.data import Batch, Layout, prediction, task_loss


@torch.no_grad()
def _set(sn, kind: str, gen: torch.Generator) -> None:
    for gate in sn.width_gates().values():
        if kind == "max":
            gate.alpha.fill_(1.0)
        elif kind == "min":
            gate.alpha.fill_(0.0)
        else:
            p = gate.alpha.detach().clamp(0, 1).cpu()
            gate.alpha.copy_(torch.cumprod(torch.bernoulli(p, generator=gen), 0).to(gate.alpha.device))
    for gate in sn.depth_gates().values():
        if kind == "rand":
            keep = torch.bernoulli(gate.beta.detach().clamp(0, 1).cpu().view(1), generator=gen)
            gate.beta.fill_(float(keep))
        else:
            gate.beta.fill_(1.0 if kind == "max" else 0.0)


def sandwich_step(sn, batch, opt, cfg, ctx, teacher, step: int) -> float:
    """One sandwich weight step (see module docstring); returns the largest sub-network's task loss."""
    batch = (batch if isinstance(batch, Batch) else Layout().batch(batch)).to(ctx.device)
    arch = sn.arch_parameters()
    saved = [p.detach().clone() for p in arch]
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    with torch.no_grad(), dist.autocast(ctx.device, ctx.precision):
        soft = F.log_softmax(prediction(batch.call(teacher)).float() / cfg.kd_temperature, -1)
    opt.zero_grad(set_to_none=True)
    for p in arch:
        p.requires_grad_(False)
    try:
        task = 0.0
        for kind in ("max", "min", "rand"):
            _set(sn, kind, gen)
            with dist.autocast(ctx.device, ctx.precision):
                out = prediction(batch.call(sn.gm)).float()
            if kind == "max":
                loss = task_loss(out, batch, cfg.loss_fn)
                task = float(loss.detach())
            else:
                t = cfg.kd_temperature
                rows = out.reshape(-1, out.shape[-1]) / t
                loss = t * t * F.kl_div(F.log_softmax(rows, -1), soft.reshape(rows.shape), log_target=True,
                                        reduction="batchmean")
            loss.backward()
    finally:
        with torch.no_grad():
            for p, v in zip(arch, saved):
                p.copy_(v)
                p.requires_grad_(True)
    dist.sync_step([p for g in opt.param_groups for p in g["params"]], sn.gm, ctx, batch.size)
    opt.step()
    return task
