"""The pieces every gradient search here is made of: its supernet and batches, one optimiser step, the noise
of a step, and a gate-only search.

- ``prepare``: the supernet of a search (the model itself when shrinking unless
  ``elastic_when_shrinking``; for growth the grown space), sampled gates started around the uniform scale
  ``sqrt(center)`` of the budget, and the training / validation batch streams of this rank. Without
  validation data the gate steps read ``data`` too, or, with ``SearchConfig.holdout = f``, a seeded
  fraction ``f`` of it that the weight steps never see (DARTS' split of the training set: a gate then
  pays for what generalises, not for what the weights memorised).
- ``train_step``: one optimiser step on ``L_task + extra()``; the ``frozen`` parameters get no gradient.
- ``distil_step``: one weight step distilled from the original (``teacher``): ``(1 - kd) L_task(s, y) + kd
  T^2 KL(p_T(t) || p_T(s))`` (``SearchConfig.kd``, ``.kd_temperature``; ``fxadapt.train.finetune.kd_loss``),
  without labels the KL term alone, with ``kd = 0`` the task loss (label-free: KL at T = 1 to the
  ``Batches.teacher``'s reference) as before distillation was the default.
- ``noise``: the generator of one step's weight (phase 0) or gate (phase 1) forward, a function of
  ``(seed, step)`` only, so every rank and a resumed run draw the same sub-networks.
- ``gate_search``: ``steps`` architecture-only steps, ``L_task + lambda * L_budget(E[MACs], T)`` on the
  gates (Adam, projected after every step), the weights untouched. The many-budgets search runs it per
  budget on the shared supernet; ``SearchConfig(weights="frozen")`` runs it alone on the inherited weights
  (the temperature then anneals as in the alternating search). A history entry per step has a
  ``"gate_step"`` key (never ``"step"``, which counts weight steps).

>>> import torch, fxadapt
>>> from fxadapt.search.dna import SearchConfig
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(),
...                         torch.nn.Linear(16 * 6 * 6, 4))
>>> x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
>>> a = fxadapt.analyze(m, (x[:1],))
>>> cfg = SearchConfig(steps=4, batch_size=16, progress=False)
>>> sn, train, val = prepare(a, 0.5 * a.macs(), (x, y), None, cfg)
>>> history = gate_search(sn, train, 0.5 * a.macs(), False, cfg, schedule=GateSchedule(steps=2))
>>> sorted(history[0])
['gate_step', 'macs_ratio', 'val_loss']
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from fxadapt import dist, meta
from fxadapt.search.losses import arch_penalty
from fxadapt.search.supernet import Supernet, build_supernet
from fxadapt.train.data import Batch, Batches, Data, Layout, as_tensors, is_map_style, prediction, task_loss
from fxadapt.train.finetune import kd_loss

if TYPE_CHECKING:

    from fxadapt.analysis.analyze import Analysis
    from fxadapt.search.dna import SearchConfig


def holdout(data: Any, fraction: float, seed: int):
    """``(rest, held)``: a seeded ``fraction`` of ``data`` (tensors or a map-style dataset) held out, or
    ``(data, None)`` when ``data`` cannot be split (a ``DataLoader``, an iterable) or ``fraction`` is 0."""
    from torch.utils.data import Subset

    if isinstance(data, Data):
        rest, held = holdout(data.source, fraction, seed)
        return (data, None) if held is None else (data.with_source(rest), data.with_source(held))
    tensors = as_tensors(data)
    n = len(tensors[0]) if tensors is not None else (len(data) if is_map_style(data) else 0)
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        return data, None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729))
    rest, held = perm[k:].sort().values, perm[:k].sort().values
    if tensors is not None:
        return tuple(t[rest] for t in tensors), tuple(t[held] for t in tensors)
    return Subset(data, rest.tolist()), Subset(data, held.tolist())


def prepare(a0: Analysis, center: float, data: Any, val_data: Any, cfg: SearchConfig,
            ctx: dist.DistContext | None = None):
    """``(supernet, train batches, val batches)`` of a search toward ``center`` MACs (module docstring)."""
    ctx = ctx or dist.DistContext()
    if val_data is None and cfg.holdout > 0:
        data, val_data = holdout(data, cfg.holdout, cfg.seed)
    torch.manual_seed(cfg.seed)
    base = a0.macs()
    sn_cfg = cfg.supernet
    if center <= base and not cfg.elastic_when_shrinking:
        sn_cfg = dataclasses.replace(sn_cfg, expand=1.0, depth_slots=0)
    sn = build_supernet(a0, None, sn_cfg)
    train = batches_of(a0, data, cfg.batch_size, cfg.seed, ctx)
    val = batches_of(a0, val_data if val_data is not None else data, cfg.batch_size, cfg.seed + 7919, ctx,
                     train.teacher)
    if sn.sampled and cfg.gate_init == "budget":
        sn.center(math.sqrt(center / base))
    return sn, train, val


def batches_of(a0: Analysis, data: Any, batch_size: int, seed: int, ctx: dist.DistContext,
               teacher: nn.Module | None = None) -> Batches:
    """This rank's batches of ``data`` for a search on ``a0``'s graph: split as the graph is called (the
    layout ``transform`` checked, or the graph's example inputs); without labels they distil from the original
    (``Batches.teacher``)."""
    layout = None if isinstance(data, Data) else Layout(a0.gm.meta.get(meta.INPUTS))
    batches = Batches(data, batch_size, seed, ctx.rank, ctx.world, layout=layout)
    if not batches.has_labels:
        batches.teacher = teacher if teacher is not None else teacher_of(a0, ctx)
    return batches


def teacher_of(a0: Analysis, ctx: dist.DistContext) -> nn.Module:
    """A frozen copy of the original graph on ``ctx``'s device (the sandwich rule distils from it)."""
    return copy.deepcopy(a0.gm).to(ctx.device).eval()


def _trainable(params, on: bool) -> None:
    for p in params:
        p.requires_grad_(on)


def train_step(sn: Supernet, batch, opt, cfg: SearchConfig, ctx: dist.DistContext, frozen,
               extra: Callable[[], torch.Tensor] | None = None) -> float:
    """One optimiser step on ``opt``'s parameters on ``batch`` (a ``Batch``, or an ``(x, y)`` tuple);
    ``frozen`` get no gradient (less compute and memory). Returns the task loss (without ``extra``)."""
    batch = (batch if isinstance(batch, Batch) else Layout().batch(batch)).to(ctx.device)
    return _optimise(sn, batch, opt, ctx, frozen, lambda pred: task_loss(pred, batch, cfg.loss_fn), extra)


def distil_step(sn: Supernet, batch, opt, cfg: SearchConfig, ctx: dist.DistContext,
                teacher: nn.Module | None) -> float:
    """One weight step (the gates frozen) on the distillation loss from ``teacher`` (module docstring);
    returns that loss."""
    batch = (batch if isinstance(batch, Batch) else Layout().batch(batch)).to(ctx.device)
    user = None if cfg.loss_fn is F.cross_entropy else cfg.loss_fn
    if teacher is None or cfg.kd <= 0 or (user is not None and batch.targets is not None):
        # a user loss with labels trains alone: whether it can take the original's output as its target
        # (a regression) or not (a loss on token ids) is the user's to say, with their own loss
        return train_step(sn, batch, opt, cfg, ctx, sn.arch_parameters())
    ref = batch.reference
    if ref is None:
        with torch.no_grad(), dist.autocast(ctx.device, ctx.precision):
            ref = prediction(batch.call(teacher))
    return _optimise(sn, batch, opt, ctx, sn.arch_parameters(),
                     lambda pred: kd_loss(pred, batch, ref.float(), cfg.kd, cfg.kd_temperature, user))


def _optimise(sn: Supernet, batch: Batch, opt, ctx: dist.DistContext, frozen, loss_of: Callable,
              extra: Callable[[], torch.Tensor] | None = None) -> float:
    """``opt.step()`` on ``loss_of(prediction) + extra()``; returns the first term."""
    stepped = [p for g in opt.param_groups for p in g["params"]]
    opt.zero_grad(set_to_none=True)
    _trainable(frozen, False)
    try:
        with dist.autocast(ctx.device, ctx.precision):
            out = batch.call(sn.gm)
        loss = loss_of(prediction(out).float())
        total = loss + extra() if extra is not None else loss
        total.backward()
    finally:
        _trainable(frozen, True)
    dist.sync_step(stepped, sn.gm, ctx, batch.size)
    opt.step()
    return float(loss.detach())


class SharedAdam(torch.optim.Optimizer):
    """Adam whose second moment is one number for all its parameters: ``v = EMA(mean of g^2 over every
    entry)``, so a step is ``lr * m / sqrt(v)`` with ``m`` each entry's own first moment. Per-entry Adam
    gives every gate the same step size whatever its gradient, and with it the budget loss, which pulls
    every group in proportion to its cost, outweighs the task gradient's differences between groups; the
    shared scale keeps those differences (the allocation signal) and stays free of the loss's scale.

    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> opt = SharedAdam([p], lr=0.1)
    >>> p.grad = torch.tensor([1.0, 0.1]); opt.step()
    >>> [round(v, 3) for v in p.tolist()]        # one scale: the steps keep the gradients' ratio
    [-0.141, -0.014]
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.state["shared"] = {"v": 0.0, "t": 0}

    @torch.no_grad()
    def step(self, closure=None):
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not ps:
            return None
        b1, b2 = self.param_groups[0]["betas"]
        shared = self.state["shared"]
        shared["t"] += 1
        sq = torch.cat([p.grad.reshape(-1) for p in ps]).pow(2).mean()
        shared["v"] = b2 * float(shared["v"]) + (1 - b2) * float(sq)
        v_hat = shared["v"] / (1 - b2 ** shared["t"])
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                p.add_(m / (1 - b1 ** shared["t"]), alpha=-group["lr"] / (v_hat ** 0.5 + group["eps"]))
        return None


def gate_optimizer(sn: Supernet, cfg: SearchConfig) -> torch.optim.Optimizer | None:
    """The architecture steps' optimizer (``SearchConfig.a_optimizer``), or None without gates."""
    if not sn.arch_parameters():
        return None
    kind = SharedAdam if cfg.a_optimizer == "shared" else torch.optim.Adam
    return kind(sn.arch_parameters(), lr=cfg.a_lr)


def noise(cfg: SearchConfig, step: int, phase: int) -> torch.Generator:
    """The noise of one step's weight (0) or gate (1) forward: the same on every rank and after a resume."""
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 2 + phase)


def tau_at(cfg: SearchConfig, step: int, first: int, end: int) -> float:
    """Gumbel temperature, exponential from ``temperature[0]`` at gate step ``first`` to ``[1]`` at
    ``end``."""
    t0, t1 = cfg.temperature
    frac = min(max((step - first) / max(end - first - 1, 1), 0.0), 1.0)
    return float(t0 * (t1 / t0) ** frac)


@dataclasses.dataclass(frozen=True)
class GateSchedule:
    """Which gate steps ``gate_search`` runs: ``steps`` of them (None: ``SearchConfig.steps``), their batches
    and noise drawn from step ``offset`` on; sampled gates at the final temperature, or with ``anneal`` the
    temperature and the budget loss's ramp annealed over the steps."""

    steps: int | None = None
    offset: int = 0
    anneal: bool = False


def gate_search(sn: Supernet, batches: Batches, target: float, grow: bool, cfg: SearchConfig,
                ctx: dist.DistContext | None = None, schedule: GateSchedule = GateSchedule()) -> list[dict]:
    """``schedule.steps`` gate-only steps toward ``target`` from the current state (module docstring)."""
    ctx = ctx or dist.DistContext()
    steps = cfg.steps if schedule.steps is None else schedule.steps
    offset, anneal = schedule.offset, schedule.anneal
    opt = gate_optimizer(sn, cfg)
    if opt is None:
        return []
    sn.gm.to(ctx.device).train()
    history = []
    for s in range(steps):
        ramp = (s + 1) / steps if anneal else 1.0
        if sn.sampled:
            sn.resample(noise(cfg, offset + s, 1), tau_at(cfg, s, 0, steps) if anneal else cfg.temperature[1])
        loss = train_step(sn, batches.get(offset + s, ctx.device), opt, cfg, ctx, sn.weight_parameters(),
                          lambda ramp=ramp: arch_penalty(sn, target, grow, cfg, ramp))
        sn.project()
        with torch.no_grad():
            history.append({"gate_step": s, "val_loss": loss,
                            "macs_ratio": float(sn.expected_macs()) / target})
    sn.resample(None)
    return history
