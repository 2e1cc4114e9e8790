"""Importance-driven adaptation: data chooses which units and blocks survive, a price meets the budget,
and the weight steps distil from the original (``strategy="importance"``).

Scores (``fxadapt.search.scores``), on calibration batches, through the elastic supernet's gates: per unit
fisher / taylor / activation from the gates' gradients and activations, or the exact divergence increase of
removing it (ablation, re-running only what it reaches), ``hybrid`` (default) ablation in narrow groups of
heads or experts and fisher in the others, all over the positions that count (``fxadapt.search.positions``:
a padded position is none). Fisher and ablation are one currency (``D``: the mean over samples of the KL
summed over positions; fisher's ``S_j`` is its second-order estimate), and agree where removing one unit is
a small step (fisher / ablation summed over a group: 0.93-1.33 on a trained GPT-2's 64- and 256-unit groups,
Spearman 0.86-0.96); in the 8- and 16-channel groups of the digits base fisher is 3-30x too small and
misranks (stem: Spearman -0.07), yet its allocation recovers better there on the users' image protocol, so
``hybrid`` ablates only blocks of channels (``fxadapt.search.scores.exact_groups``). Under ``torchrun`` the
scores' sums are all-reduced and the weight steps' gradients averaged (``fxadapt.dist.sync_step``): every
rank takes the same allocation and the same steps.
Batches are read through ``fxadapt.train.data`` (tuples, inputs alone, dicts such as Hugging Face's
``input_ids`` / ``attention_mask``, loaders; ``Batch.call`` calls the original and the student). No labels
are read for the scores: calibration data may be inputs only. ``fxadapt.planning.allocate`` then keeps the
units and blocks with the most score per MAC (per parameter under a params budget: ``metric="params"``)
under one price ``lambda`` (bisection), width and depth alike,
each group within ``fxadapt.planning.solver.unit_bounds`` (``min_ratio``, the user's ``min_width`` /
``max_width``).

Iterative (``iterations = k``): for ``i = 1..k`` score the surviving units, prune to
``T_i = M_0 (T / M_0)^(i / k)`` (the last step aligned and repaired into the budget window by ``align``,
``fxadapt.planning.solver.fit`` + ``check_window``; under ``align="auto"`` an alignment is taken only where
it rounds the allocation, every group within one aligned step of it: ``rounding``), then ``steps / k``
distillation steps (SGD; loss ``kd * tau^2 KL_tau(t || s) + (1 - kd) loss_fn(s, y)``, or MSE to the original
for ``loss="mse"``) with the pruned units masked to zero, which is exactly the pruned network. Every weight
step is one history entry with a ``"step"`` key. Returns the supernet graph without gates and the plan that
cuts the masked units.
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

from fxadapt import dist
from fxadapt.errors import BudgetError, InputError, SearchConfigError
from fxadapt.options import RUN_OPTIONS, Options
from fxadapt.passes.insert_gates import strip_gates
from fxadapt.planning.align import unit_step
from fxadapt.planning.allocate import allocate, top_units, uniform_scale
from fxadapt.planning.plan import make_plan
from fxadapt.planning.solver import SolveConfig, check_window, fit, limited, unit_bounds
from fxadapt.search.loop import batches_of, teacher_of
from fxadapt.search.positions import distill, divergence, drawn_targets, position_mask, sample_loss
from fxadapt.search.scores import (
    EXACT_UNITS,
    Calibration,
    Hooks,
    Masks,
    ablation_scores,
    as_batch,
    block_scores,
    score,
    site_masks,
)
from fxadapt.search.supernet import Supernet, SupernetConfig, build_supernet
from fxadapt.train.data import Batch, Batches, Data, as_mapping, as_tensors, prediction, task_loss

__all__ = ["EXACT_UNITS", "Hooks", "ImportanceConfig", "Masks", "ablation_scores", "as_batch", "block_scores",
           "distill_loss", "divergence", "drawn_targets", "importance", "sample_loss", "score", "site_masks",
           "train"]

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
                     f"in groups of at most {EXACT_UNITS} surviving units that are blocks of channels "
                     "(heads, experts), fisher in the others",
             "loss": "'kl': logits (distribution over the last axis), 'mse': a regression output",
             "screen": "False: one allocation over every axis; True: screen the axis candidates "
                       "(fxadapt.search.screen); n: the first n of them"}

    iterations: int = 3           # prune steps, geometric toward the target
    steps: int = 60               # distillation weight steps in all (split over the iterations)
    calib_batches: int = 4        # calibration batches per scoring
    batch_size: int = 64
    lr: float = 0.02
    # "hybrid" (exact for narrow groups of heads / experts, fisher elsewhere), chosen on the users'
    # protocols' val data: fisher on single channels +1.6 / +2.7 / +5.4 points on images at 0.5 / 0.25 / 0.1x,
    # exact heads worth 0.4 / 2.2 val perplexity on the LM at 0.25 / 0.1x (fxadapt.search.scores.exact_groups)
    kind: Literal["fisher", "taylor", "activation", "ablation", "hybrid"] = "hybrid"
    loss: Literal["kl", "mse"] = "kl"
    kd: float = 1.0               # distillation weight in the weight steps (1: the original's outputs only)
    temperature: float = 4.0
    # every group keeps >= floor x its uniformly scaled width (0: min_ratio only)
    floor: float = 0.0
    floors: tuple[float, ...] = ()   # screen: the all-free allocation under these floors too (search.screen)
    depth: bool = False           # also score and remove whole blocks (same currency; off: it cost accuracy
                                  # at 0.1x on digits, bench/quality.py "importance-depth")
    seed: int = 0
    screen: int | bool = False    # axis candidates ranked by validation KL (fxadapt.search.screen)
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
        self.check(all(0.0 <= f <= 1.0 for f in self.floors), "floors", "values in [0, 1]")
        self.check(isinstance(self.screen, bool) or self.screen >= 0, "screen", "a bool or >= 0")


def distill_loss(out: torch.Tensor, t_out: torch.Tensor, batch: Batch | None, cfg: ImportanceConfig
                 ) -> torch.Tensor:
    """``kd * tau^2 KL_tau(t || s) + (1 - kd) loss_fn(s, y)`` (``"mse"``: MSE to the original's output), the
    KL over the positions that count (``fxadapt.search.positions.distill``); the task loss is
    ``fxadapt.train.data.task_loss`` on ``batch``'s targets (skipped without them)."""
    kd = distill(out, t_out, cfg.loss, cfg.temperature, position_mask(batch))
    if cfg.kd >= 1.0 or batch is None or batch.targets is None:
        return kd
    return cfg.kd * kd + (1 - cfg.kd) * task_loss(out, batch, cfg.loss_fn)


def train(sn: Supernet, masks: Masks, teacher: nn.Module, batches: Batches, start: int, steps: int,
          opt: torch.optim.Optimizer, cfg: ImportanceConfig, ctx: dist.DistContext) -> list[dict]:
    """``steps`` distillation steps on the masked supernet; one history entry per weight step."""
    sn.gm.train()
    history = []
    weights = sn.weight_parameters()
    with Hooks(sn, masks):
        for s in range(start, start + steps):
            batch = batches.get(s, ctx.device)
            with torch.no_grad():
                t_out = (batch.reference if batch.reference is not None
                         else prediction(batch.call(teacher))).float()
            loss = distill_loss(prediction(batch.call(sn.gm)).float(), t_out, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.sync_step(weights, sn.gm, ctx, batch.size)   # every rank: the same step (fxadapt.dist)
            opt.step()
            history.append({"step": s, "loss": float(loss.detach())})
    return history


def check_samples(data: Any, cfg: ImportanceConfig) -> None:
    """Refuse, before any work, data with fewer samples than one batch (``batch_size``; a loader of unknown
    length is not checked). Fewer than ``calib_batches x batch_size`` samples are read more than once."""
    t, mp = as_tensors(data), as_mapping(data)
    n = (data.samples if isinstance(data, Data) else len(t[0]) if t is not None
         else len(next(iter(mp.values()))) if mp is not None else None)
    if n is not None and n < cfg.batch_size:
        raise InputError(f"data has {n} samples but strategy='importance' reads batches of "
                         f"ImportanceConfig.batch_size = {cfg.batch_size}: give at least {cfg.batch_size} "
                         "samples or lower batch_size")


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


def rounding(a: Analysis, n: dict[int, int], ref: dict[int, int], align: int) -> None:
    """Raise ``BudgetError`` when the aligned widths ``n`` move a group more than one aligned step from the
    allocation ``ref``: under ``align="auto"`` the alignment is then halved (``pipeline.strategies.
    halving``), so aligning rounds the data's allocation instead of replacing it (on a two-group ESPCN at
    0.25x, alignment 8 leaves only the data-free widths [8, 24] in the window, far from the data's
    [17, 12]; alignment 1 keeps [21, 10])."""
    far = {g: (ref[g], v) for g, v in n.items() if g in ref
           and abs(v - ref[g]) > unit_step(align, a.groups[g].granularity)}
    if far:
        raise BudgetError(f"widths aligned to {align} move groups more than one step from the importance "
                          f"allocation (group: (allocated, aligned)): {far}")


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
            if cfg.solve.align == "auto" and solve.alignment() > 1:   # coarser only while it rounds
                rounding(a, n, units, solve.alignment())
            return n

        units, step = align(attempt, a, {g: int(k.sum()) for g, k in masks.units.items()})
    keep = {g: top_units(scores[g], masks.units[g], units[g]) for g in masks.units}
    return Masks(keep, present), step


def importance(a0: Analysis, target: float, data: Any, val_data: Any=None,
               cfg: ImportanceConfig = ImportanceConfig(), ctx: dist.DistContext | None = None,
               align: Callable | None = None, metric: Literal["macs", "params"] = "macs"):
    """The importance strategy on an analysed model ``a0`` toward ``target`` MACs (``metric="params"``:
    parameters; the allocation prices units by the marginal of that count, ``Analysis.params_as_macs``,
    and the last step is aligned and repaired on it) (module docstring);
    ``align(attempt, a, alive)`` runs the last step's rounding ``attempt(solve) -> units`` at an
    alignment and returns ``(units, alignment)`` (default: ``cfg.solve`` as it is); ``a`` is the
    supernet's analysis and ``alive`` the units each group still has (a latency repair re-times the widths
    on ``a``, keeping at most ``alive``). ``val_data`` is not read (the calibration
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
    counted = (lambda an: an.params_as_macs()) if metric == "params" else (lambda an: an)  # noqa: E731
    base = counted(a0).macs()
    if target > base:
        raise SearchConfigError(f"strategy='importance' shrinks: the budget of {target / base:.3f}x is "
                                f"above the original's {metric} (grow with strategy='datafree' or 'dna')")
    check_samples(data, cfg)
    torch.manual_seed(cfg.seed)
    sn = build_supernet(a0, None, SupernetConfig(expand=1.0, depth_slots=0, gates="markov"))
    sn.gm.to(ctx.device)
    dist.broadcast_state(sn.gm, ctx)
    for p in sn.arch_parameters():
        p.requires_grad_(False)
    a = counted(sn.analysis)
    align = align or (lambda attempt, *_: (attempt(cfg.solve), cfg.solve.alignment()))
    teacher = teacher_of(a0, ctx)
    batches = batches_of(a0, data, cfg.batch_size, cfg.seed, ctx, teacher)
    probe = batches_of(a0, data, cfg.batch_size, cfg.seed + 7919, ctx, teacher)
    calib = Calibration.of([dataclasses.replace(probe.get(k), reference=None)
                            for k in range(cfg.calib_batches)], teacher, ctx.device)
    masks = Masks({g: np.ones(w.units, dtype=bool) for g, w in sn.spec.widths.items()},
                  {b: True for b in sn.spec.depths} if cfg.depth else {})
    bounds = _bounds(sn, list(masks.units), cfg.solve)
    opt = torch.optim.SGD(sn.weight_parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    history, done, step = [], 0, 1
    for it in range(cfg.iterations):
        goal = base * (target / base) ** ((it + 1) / cfg.iterations)
        units, blocks = score(sn, masks, teacher, calib, cfg, it, ctx.device, ctx)
        final = it == cfg.iterations - 1
        masks, step = _prune(a, masks, units, blocks, goal, bounds, final, cfg, align, base)
        n, d = masks.counts()
        history.append({"iteration": it, f"{metric}_ratio": a.cost.macs(n, d) / base,
                        "goal_ratio": goal / base,
                        "blocks_removed": sorted(int(b) for b, on in masks.blocks.items() if not on)})
        steps = cfg.steps // cfg.iterations + (cfg.steps % cfg.iterations if final else 0)
        history += train(sn, masks, teacher, batches, done, steps, opt, cfg, ctx)
        done += steps
    sn.gm.to("cpu")
    n, d = masks.counts()
    plain = strip_gates(sn.gm).graph_module
    plan = make_plan(sn.analysis, n, remove={b for b, on in d.items() if not on},
                     scores={g: k.astype(float) for g, k in masks.units.items()})
    history.append({"seconds": time.perf_counter() - t0, "align": step,
                    "searched": f"importance ({cfg.kind})", "widths": {int(g): int(v) for g, v in n.items()}})
    return plain, plan, sn, history
