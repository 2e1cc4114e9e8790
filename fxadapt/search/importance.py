"""Importance-driven adaptation: data chooses which units and blocks survive, a price meets the budget,
and the weight steps distil from the original (``strategy="importance"``).

Scores, on calibration batches, through the elastic supernet's gates (``build_supernet`` at ``expand=1``:
every unit ``j`` of group ``g`` multiplies its channels by a mask ``m_j``). With the student's output
``s(x)``, the original's ``t(x)`` and a target drawn from the original, ``y ~ softmax(t(x))`` (``loss="kl"``)
or ``y = t(x) + N(0, 1)`` (``"mse"``), the per-sample loss is ``l_i = CE(s(x_i), y_i)`` (``0.5 |s - y|^2``)
and ``z_ij = m_j dl_i/dm_j`` (summed over the unit's sites and positions):

    fisher:     S_j = 0.5 mean_i z_ij^2     (removing j raises the KL to the original by ~S_j: diag Fisher)
    taylor:     S_j = |mean_i z_ij|         (first order; zero at the original itself, where KL is minimal)
    activation: S_j = mean |a_j|            (Minitron)
    ablation:   S_j = D(m_j = 0) - D        (exact, one forward per unit: for narrow layers, where removing
                                             one unit is no small step and the expansions above mislead)
    hybrid:     ablation in groups of at most ``EXACT_UNITS`` surviving units, fisher in wider ones (default)

and a removable block scores the exact increase of ``mean_i KL(t || s)`` (``0.5 |s - t|^2``) when bypassed.
Fisher and ablation are one currency (``D``: the mean over samples of the KL summed over positions; fisher's
``S_j`` is its second-order estimate), and agree where removing one unit is a small step (fisher / ablation
summed over a group: 0.93-1.33 on a trained GPT-2's 64- and 256-unit groups, Spearman 0.86-0.96); in the
8- and 16-channel groups of the digits base fisher is 3-30x too small and misranks (stem: Spearman -0.07).
Batches are read through ``fxadapt.train.data`` (tuples, inputs alone, dicts such as Hugging Face's
``input_ids`` / ``attention_mask``, loaders; ``Batch.call`` calls the original and the student). No labels
are read for the scores: calibration data may be inputs only. ``fxadapt.planning.allocate`` then keeps the
units and blocks with the most score per MAC under one price ``lambda`` (bisection), width and depth alike,
each group within ``fxadapt.planning.solver.unit_bounds`` (``min_ratio``, the user's ``min_width`` /
``max_width``).

Iterative (``iterations = k``): for ``i = 1..k`` score the surviving units, prune to
``T_i = M_0 (T / M_0)^(i / k)`` (the last step aligned and repaired into the budget window by ``align``,
``fxadapt.planning.solver.fit`` + ``check_window``), then ``steps / k`` distillation steps (SGD; loss
``kd * tau^2 KL_tau(t || s) + (1 - kd) loss_fn(s, y)``, or MSE to the original for ``loss="mse"``) with the
pruned units masked to zero, which is exactly the pruned network. Every weight step is one history entry
with a ``"step"`` key. Returns the supernet graph without gates and the plan that cuts the masked units.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fxadapt import dist
from fxadapt.errors import SearchConfigError
from fxadapt.options import RUN_OPTIONS, Options
from fxadapt.passes.insert_gates import GATE_ROOT, strip_gates
from fxadapt.planning.allocate import allocate, top_units, uniform_scale
from fxadapt.planning.plan import make_plan
from fxadapt.planning.solver import SolveConfig, check_window, fit, limited, unit_bounds
from fxadapt.search.loop import batches_of, teacher_of
from fxadapt.search.supernet import Supernet, SupernetConfig, build_supernet
from fxadapt.train.data import Batch, Batches, Layout, prediction, task_loss

EXACT_UNITS = 16    # kind="hybrid": groups with at most this many surviving units are scored by ablation

if TYPE_CHECKING:

    from fxadapt.analysis.analyze import Analysis


@dataclass(frozen=True)
class ImportanceConfig(Options):
    """Options of the importance strategy (``TransformConfig.importance``); checked at construction."""

    error = SearchConfigError
    moved = RUN_OPTIONS
    hints = {"kind": "'fisher': squared per-sample gate gradients against targets drawn from the original, "
                     "'taylor': |mean gate gradient|, 'activation': mean |activation|, 'ablation': the exact "
                     "divergence increase of removing each unit alone (one forward per unit), 'hybrid': "
                     "ablation "
                     f"in groups of at most {EXACT_UNITS} surviving units, fisher in wider ones",
             "loss": "'kl': logits (distribution over the last axis), 'mse': a regression output"}

    iterations: int = 3           # prune steps, geometric toward the target
    steps: int = 60               # distillation weight steps in all (split over the iterations)
    calib_batches: int = 4        # calibration batches per scoring
    batch_size: int = 64
    lr: float = 0.02
    # "hybrid" (exact in narrow groups) over "fisher": +1.5 / +2.7 val points on digits at 0.25x / 0.1x
    # (5 seeds, bench/quality.py importance-fisher); the two agree in scale on wide groups
    kind: Literal["fisher", "taylor", "activation", "ablation", "hybrid"] = "hybrid"
    loss: Literal["kl", "mse"] = "kl"
    kd: float = 1.0               # distillation weight in the weight steps (1: the original's outputs only)
    temperature: float = 4.0
    # every group keeps >= floor x its uniformly scaled width (0: min_ratio only)
    floor: float = 0.0
    depth: bool = False           # also score and remove whole blocks (same currency; off: it cost accuracy
                                  # at 0.1x on digits, bench/quality.py "importance-depth")
    seed: int = 0
    solve: SolveConfig = field(default_factory=SolveConfig)   # min_ratio, tol, strict, align of the last step
    loss_fn: Callable = nn.functional.cross_entropy          # the task loss when kd < 1 (labels needed)

    def __post_init__(self):
        super().__post_init__()
        self.check(self.iterations >= 1, "iterations", "at least 1")
        self.check(self.steps >= 0, "steps", "at least 0")
        self.check(self.calib_batches >= 1, "calib_batches", "at least 1")
        self.check(self.batch_size >= 1, "batch_size", "at least 1")
        self.check(self.lr > 0, "lr", "above 0")
        self.check(0.0 <= self.kd <= 1.0, "kd", "in [0, 1]")
        self.check(self.temperature > 0, "temperature", "above 0")
        self.check(0.0 <= self.floor <= 1.0, "floor", "in [0, 1]")


@dataclass
class Masks:
    """The surviving units (``units[g]``: bool per unit) and blocks (``blocks[b]``) of an iterative prune."""

    units: dict
    blocks: dict

    def counts(self) -> tuple[dict[int, int], dict[int, float]]:
        return ({g: int(k.sum()) for g, k in self.units.items()},
                {b: float(on) for b, on in self.blocks.items()})


def site_masks(sn: Supernet) -> dict[int, list[nn.Module]]:
    """Per gated group, the ``SiteMask`` modules that multiply its sites by its unit mask."""
    out = {}
    for gid in sn.spec.widths:
        n = len(sn.analysis.groups[gid].members)
        found = [sn.gm.get_submodule(f"{GATE_ROOT}.w{gid}_s{k}") for k in range(n)
                 if hasattr(sn.gm.get_submodule(GATE_ROOT), f"w{gid}_s{k}")]
        out[gid] = found
    return out


class Hooks:
    """Masks the pruned units and blocks of ``sn`` (the gates' outputs times the keep masks) and, with
    ``record``, collects per-sample ``z_ij`` (``grad``) or ``sum |a_ij|`` (``act``) at every site."""

    def __init__(self, sn: Supernet, masks: Masks, record: bool = False):
        self.sn, self.masks, self.record = sn, masks, record
        self.z: dict[int, torch.Tensor] = {}
        self.batch = 0          # samples in the batch being recorded (rows of z)
        self.act: dict[int, torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self):
        for gid, gate in self.sn.width_gates().items():
            keep = torch.as_tensor(self.masks.units[gid], dtype=torch.float32)
            self.handles.append(gate.register_forward_hook(lambda _m, _i, out,
                                                           k=keep: out * k.to(out.device)))
        for bid, gate in self.sn.depth_gates().items():
            on = float(self.masks.blocks.get(bid, True))
            self.handles.append(gate.register_forward_hook(lambda _m, _i, out, on=on: out * on))
        if self.record:
            for gid, sites in site_masks(self.sn).items():
                for site in sites:
                    self.handles.append(site.register_forward_hook(self._site_hook(gid, site)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _site_hook(self, gid: int, site):
        units = len(self.masks.units[gid])

        def per_unit(t: torch.Tensor) -> torch.Tensor:   # (B, units): summed over positions and sites' axes
            axis = site.axis - site.ndim + t.dim()
            other = [d for d in range(1, t.dim()) if d != axis]
            per = (t.sum(other) if other else t).float()
            per = per if axis != 0 else per.unsqueeze(0)
            idx = site.index.to(per.device)
            pos = idx >= 0
            return per.new_zeros(per.shape[0], units).index_add_(1, idx[pos], per[:, pos])

        def hook(_m, inputs, out):
            x = inputs[0].detach()
            self.act[gid] = self.act.get(gid, 0) + per_unit(x.abs()).sum(0)
            if out.requires_grad:
                out.register_hook(lambda g: self._add_z(gid, per_unit(x * g)))
        return hook

    def _add_z(self, gid: int, z: torch.Tensor) -> None:
        b = self.batch or z.shape[0]
        if z.shape[0] != b:     # a site whose rows are (sample, position) flattened, as in Conv1D's addmm
            z = (z.view(b, -1, z.shape[1]).sum(1) if z.shape[0] % b == 0
                 else (z.sum(0) / b).expand(b, -1))
        self.z[gid] = self.z[gid] + z if gid in self.z else z


def drawn_targets(t_out: torch.Tensor, loss: str, gen: torch.Generator) -> torch.Tensor:
    """Targets drawn from the original's predictive distribution: a class per position (``"kl"``) or the
    output plus unit Gaussian noise (``"mse"``); ``gen`` makes the draw reproducible."""
    if loss == "mse":
        return t_out + torch.randn(t_out.shape, generator=gen).to(t_out)
    p = torch.softmax(t_out.reshape(-1, t_out.shape[-1]).double().cpu(), -1)
    return torch.multinomial(p, 1, generator=gen).view(t_out.shape[:-1]).to(t_out.device)


def sample_loss(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Sum over samples of the per-sample loss against drawn targets (``drawn_targets``)."""
    if loss == "mse":
        return 0.5 * (out - y).pow(2).sum()
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def divergence(out: torch.Tensor, t_out: torch.Tensor, loss: str) -> float:
    """``sum_i KL(t_i || s_i)`` over samples (and positions), or ``sum_i 0.5 |s_i - t_i|^2``."""
    if loss == "mse":
        return float(0.5 * (out - t_out).pow(2).sum())
    lt, ls = (F.log_softmax(v.reshape(-1, v.shape[-1]).float(), -1) for v in (t_out, out))
    return float((lt.exp() * (lt - ls)).sum())


def as_batch(b: Any) -> Batch:
    """A calibration batch as a ``Batch``: a ``Batch`` as it is, a tensor as the model's one input."""
    if isinstance(b, Batch):
        return b
    return Layout().batch((b,) if isinstance(b, torch.Tensor) else b)


def score(sn: Supernet, masks: Masks, teacher: nn.Module, calib: list, cfg: ImportanceConfig, rnd: int,
          device: str = "cpu") -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Per-unit scores of every gated group and the bypass score of every surviving block (module
    docstring) on the ``calib`` batches (``Batch`` es, or input tensors); ``rnd`` seeds the drawn targets."""
    calib = [as_batch(b) for b in calib]
    blocks = block_scores(sn, masks, teacher, calib, cfg, device) if cfg.depth else {}
    if cfg.kind == "ablation":
        return ablation_scores(sn, masks, teacher, calib, cfg, device), blocks
    sn.gm.eval()
    weights = sn.weight_parameters()
    acc: dict[int, torch.Tensor] = {}
    n = 0
    with Hooks(sn, masks, record=True) as h:
        for k, b in enumerate(calib):
            b = b.to(device)
            with torch.no_grad():
                t_out = prediction(b.call(teacher)).float()
            out = prediction(b.call(sn.gm)).float()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * rnd + k)
            h.z, h.batch = {}, b.size
            if cfg.kind != "activation":
                sample_loss(out, drawn_targets(t_out, cfg.loss, gen), cfg.loss).backward()
            for gid, z in h.z.items():
                v = z.sum(0) if cfg.kind == "taylor" else z.pow(2).sum(0)
                acc[gid] = acc[gid] + v if gid in acc else v
            n += b.size
            for p in weights:
                p.grad = None
    if cfg.kind == "activation":
        units = {g: (h.act[g] / n).double().cpu().numpy() for g in h.act}
    elif cfg.kind == "taylor":
        units = {g: (v / n).abs().double().cpu().numpy() for g, v in acc.items()}
    else:
        units = {g: (0.5 * v / n).double().cpu().numpy() for g, v in acc.items()}
    units = {g: units.get(g, np.zeros(len(k))) for g, k in masks.units.items()}
    if cfg.kind == "hybrid":    # narrow groups: the exact increase, in the same currency as fisher's
        narrow = [g for g, k in masks.units.items() if 1 < k.sum() <= EXACT_UNITS]
        units.update(ablation_scores(sn, masks, teacher, calib, cfg, device, narrow))
    return units, blocks


def _divergence_of(sn: Supernet, teacher: nn.Module, calib: list, cfg: ImportanceConfig, device: str):
    """``D(masks)``: the mean divergence from the original (module docstring) of ``sn`` under given masks."""
    bs = [as_batch(b).to(device) for b in calib]
    t_outs = [prediction(b.call(teacher)).float() for b in bs]
    n = sum(b.size for b in bs)

    def div(m: Masks) -> float:
        with Hooks(sn, m):
            return sum(divergence(prediction(b.call(sn.gm)).float(), t, cfg.loss)
                       for b, t in zip(bs, t_outs)) / n
    return div


@torch.no_grad()
def ablation_scores(sn: Supernet, masks: Masks, teacher: nn.Module, calib: list, cfg: ImportanceConfig,
                    device: str = "cpu", groups: list[int] | None = None) -> dict[int, np.ndarray]:
    """Per surviving unit of ``groups`` (default: all), the exact divergence increase of removing it alone
    (0 for removed units)."""
    sn.gm.eval()
    out: dict[int, np.ndarray] = {}
    if groups is not None and not groups:
        return out
    div = _divergence_of(sn, teacher, calib, cfg, device)
    base = div(masks)
    for g, keep in masks.units.items():
        if groups is not None and g not in groups:
            continue
        out[g] = np.zeros(len(keep))
        for j in np.flatnonzero(keep):
            k = keep.copy()
            k[j] = False
            out[g][j] = max(div(Masks({**masks.units, g: k}, masks.blocks)) - base, 0.0)
    return out


@torch.no_grad()
def block_scores(sn: Supernet, masks: Masks, teacher: nn.Module, calib: list, cfg: ImportanceConfig,
                 device: str = "cpu") -> dict[int, float]:
    """Per surviving block, ``mean_i`` of the divergence from the original with it bypassed minus without."""
    alive = [b for b, on in masks.blocks.items() if on]
    if not alive:
        return {}
    sn.gm.eval()
    div = _divergence_of(sn, teacher, calib, cfg, device)
    base = div(masks)
    return {b: max(div(Masks(masks.units, {**masks.blocks, b: False})) - base, 0.0) for b in alive}


def distill_loss(out: torch.Tensor, t_out: torch.Tensor, batch: Batch | None, cfg: ImportanceConfig
                 ) -> torch.Tensor:
    """``kd * tau^2 KL_tau(t || s) + (1 - kd) loss_fn(s, y)`` (``"mse"``: MSE to the original's output); the
    task loss is ``fxadapt.train.data.task_loss`` on ``batch``'s targets (skipped without them)."""
    if cfg.loss == "mse":
        kd = F.mse_loss(out, t_out)
    else:
        tau = cfg.temperature
        kd = tau * tau * F.kl_div(F.log_softmax(out.reshape(-1, out.shape[-1]) / tau, -1),
                                  F.log_softmax(t_out.reshape(-1, t_out.shape[-1]) / tau, -1),
                                  log_target=True, reduction="batchmean")
    if cfg.kd >= 1.0 or batch is None or batch.targets is None:
        return kd
    return cfg.kd * kd + (1 - cfg.kd) * task_loss(out, batch, cfg.loss_fn)


def train(sn: Supernet, masks: Masks, teacher: nn.Module, batches: Batches, start: int, steps: int,
          opt: torch.optim.Optimizer, cfg: ImportanceConfig, ctx: dist.DistContext) -> list[dict]:
    """``steps`` distillation steps on the masked supernet; one history entry per weight step."""
    sn.gm.train()
    history = []
    with Hooks(sn, masks):
        for s in range(start, start + steps):
            batch = batches.get(s, ctx.device)
            with torch.no_grad():
                t_out = (batch.reference if batch.reference is not None
                         else prediction(batch.call(teacher))).float()
            loss = distill_loss(prediction(batch.call(sn.gm)).float(), t_out, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": s, "loss": float(loss.detach())})
    return history


def _bounds(sn: Supernet, gids, solve: SolveConfig) -> dict[int, tuple[int, int]]:
    """Units each gated group may keep: ``fxadapt.planning.solver.unit_bounds`` (``min_ratio``, experts'
    ``top_k``, the user's ``min_width`` / ``max_width``), also within the limits on the original group."""
    a, orig = sn.analysis, {g.producer: g for g in sn.original.groups}
    given = unit_bounds(a, False, solve)
    out = {}
    for g in gids:
        grp = a.groups[g]
        floor = max(1, grp.top_k or 1, math.ceil(solve.min_ratio * grp.units))
        lo, hi = given.get(g) or (min(grp.units, floor), grp.units)
        g0 = orig.get(grp.producer)
        out[g] = limited(g0, lo, hi) if g0 is not None else (lo, hi)
    return out


def _prune(a: Analysis, masks: Masks, scores: dict, blocks: dict, target: float, bounds: dict, final: bool,
           cfg: ImportanceConfig, align: Callable, base: float) -> tuple[Masks, int]:
    """``masks`` with the allocation at ``target`` applied (the last step aligned and repaired by
    ``align``)."""
    if cfg.floor > 0:   # no group below floor x the uniform scale at this target: no one-unit bottlenecks
        s = cfg.floor * uniform_scale(a, target, list(bounds))
        floor = lambda s: {g: (min(hi, max(lo, math.ceil(s * a.groups[g].units))), hi)  # noqa: E731
                           for g, (lo, hi) in bounds.items()}
        while s > 1e-3 and a.cost.macs({g: lo for g, (lo, _) in floor(s).items()}) > target:
            s *= 0.95       # the rounded-up floors must leave the budget reachable
        bounds = floor(s)
    units, present = allocate(a, target, scores, blocks, bounds, masks.units)
    present = {**masks.blocks, **{b: bool(v) for b, v in present.items()}}
    step = 1
    if final:
        live = {g: (min(bounds[g][0], int(k.sum())), int(k.sum())) for g, k in masks.units.items()}
        d = {b: float(v) for b, v in present.items()}

        def attempt(solve: SolveConfig) -> dict[int, int]:
            n = fit(a, target, live, units, False, solve, d)
            check_window(a, n, target, False, solve, d, base)
            return n

        units, step = align(attempt)
    keep = {g: top_units(scores[g], masks.units[g], units[g]) for g in masks.units}
    return Masks(keep, present), step


def importance(a0: Analysis, target: float, data: Any, val_data: Any=None,
               cfg: ImportanceConfig = ImportanceConfig(), ctx: dist.DistContext | None = None,
               align: Callable | None = None):
    """The importance strategy on an analysed model ``a0`` toward ``target`` MACs (module docstring);
    ``align(attempt)`` runs the last step's rounding ``attempt(solve) -> units`` at an alignment and returns
    ``(units, alignment)`` (default: ``cfg.solve`` as it is). ``val_data`` is not read (the calibration
    batches come from ``data``). Returns ``(graph without gates, plan, supernet, history)``.

    >>> import torch, fxadapt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                         torch.nn.Linear(16 * 6 * 6, 4))
    >>> x = torch.randn(64, 3, 8, 8)
    >>> a = fxadapt.analyze(m, (x[:1],))
    >>> g, plan, sn, hist = importance(a, 0.5 * a.macs(), (x,), cfg=ImportanceConfig(steps=4, batch_size=16))
    >>> plan.units[0] < 16, sum("step" in h for h in hist)
    (True, 4)
    """
    t0 = time.perf_counter()
    ctx = ctx if ctx is not None else dist.setup()
    if target > a0.macs():
        raise SearchConfigError(f"strategy='importance' shrinks: the budget of {target / a0.macs():.3f}x is "
                                f"above the original's MACs (grow with strategy='datafree' or 'dna')")
    if ctx.world > 1:
        raise SearchConfigError("strategy='importance' runs in one process (its scores are not all-reduced "
                                "yet): run it without torchrun, or use strategy='dna' / 'fur' there")
    torch.manual_seed(cfg.seed)
    sn = build_supernet(a0, None, SupernetConfig(expand=1.0, depth_slots=0, gates="markov"))
    sn.gm.to(ctx.device)
    for p in sn.arch_parameters():
        p.requires_grad_(False)
    a, base = sn.analysis, a0.macs()
    align = align or (lambda attempt: (attempt(cfg.solve), cfg.solve.alignment()))
    teacher = teacher_of(a0, ctx)
    batches = batches_of(a0, data, cfg.batch_size, cfg.seed, ctx, teacher)
    probe = batches_of(a0, data, cfg.batch_size, cfg.seed + 7919, ctx, teacher)
    calib = [dataclasses.replace(probe.get(k), reference=None) for k in range(cfg.calib_batches)]
    masks = Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()},
                  {b: True for b in sn.spec.depths} if cfg.depth else {})
    bounds = _bounds(sn, list(masks.units), cfg.solve)
    opt = torch.optim.SGD(sn.weight_parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    history, done, step = [], 0, 1
    for it in range(cfg.iterations):
        goal = base * (target / base) ** ((it + 1) / cfg.iterations)
        units, blocks = score(sn, masks, teacher, calib, cfg, it, ctx.device)
        final = it == cfg.iterations - 1
        masks, step = _prune(a, masks, units, blocks, goal, bounds, final, cfg, align, base)
        n, d = masks.counts()
        history.append({"iteration": it, "macs_ratio": a.cost.macs(n, d) / base, "goal_ratio": goal / base,
                        "blocks_removed": sorted(int(b) for b, on in masks.blocks.items() if not on)})
        steps = cfg.steps // cfg.iterations + (cfg.steps % cfg.iterations if final else 0)
        history += train(sn, masks, teacher, batches, done, steps, opt, cfg, ctx)
        done += steps
    sn.gm.to("cpu")
    n, d = masks.counts()
    plain = strip_gates(sn.gm).graph_module
    plan = make_plan(a, n, remove={b for b, on in d.items() if not on},
                     scores={g: k.astype(float) for g, k in masks.units.items()})
    history.append({"seconds": time.perf_counter() - t0, "align": step,
                    "searched": f"importance ({cfg.kind})", "widths": {int(g): int(v) for g, v in n.items()}})
    return plain, plan, sn, history
