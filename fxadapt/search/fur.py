"""Network Adjustment: FLOPs-utilisation-ratio (FUR) guided width search, inside the elastic supernet.

For each group ``g`` at widths ``n`` (hard, bin-aligned masks in the supernet):

    F_g   = n_g * dMACs/dn_g                 (the group's share of MACs; MACs are a polynomial in n)
    p_g   = min(p_max, p_base * mean(F) / F_g)   (FLOPs-normalised drop rate: each draw removes ~equal MACs)
    dL_g  = mean over R draws of L_val(drop a Bernoulli(p_g) subset of g's units, survivors * 1/(1-p_g)) -
    L_val FUR_g = dL_g / (p_g * F_g)               (loss increase per MAC removed: how well the group uses its
    MACs)

Each iteration trains the weights briefly at the current widths, measures FUR, grows the groups with the
highest FUR and shrinks the lowest by an adjusting rate (``rate`` x the original width, decaying linearly
with rank), then rescales all widths by one global factor (bisection) so the expected MACs meet the
budget. Growth uses the supernet's headroom (``expand``); depth is kept as in the original model.

Under ``torchrun`` (``fxadapt.dist``) training batches are sharded with gradients and BN statistics
averaged after each backward, and every validation loss is the all-reduced mean over the ranks' slices of
the validation batch, so FUR scores (and therefore widths) are identical on every rank. A tqdm bar (rank 0)
counts iterations; the last history entry lists every group's initial and final width. The device and
precision are the caller's ``ctx`` (``fxadapt.dist.DistContext``; ``fxadapt.transform`` makes it from
``TransformConfig.device`` / ``.precision``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fxadapt import dist
from fxadapt.options import RUN_OPTIONS, Options
from fxadapt.planning.budget import SolveConfig, fit
from fxadapt.planning.solver import check_window, in_window
from fxadapt.search.dna import SearchConfigError
from fxadapt.search.loop import batches_of
from fxadapt.search.supernet import Supernet, SupernetConfig, build_supernet
from fxadapt.train.data import Batch, Batches, prediction, task_loss

if TYPE_CHECKING:

    from fxadapt.analysis.analyze import Analysis


@dataclass(frozen=True)
class FurConfig(Options):
    """Every option of the FUR search (``TransformConfig.fur``); checked at construction."""

    error = SearchConfigError
    moved = RUN_OPTIONS | {"steps": "FUR's step counts are iterations= and train_steps= (steps= is DNA's)"}

    iterations: int = 4
    train_steps: int = 50
    batch_size: int = 64                    # the global batch (split over the ranks under torchrun)
    lr: float = 0.02
    p_base: float = 0.1
    p_max: float = 0.5
    draws: int = 5
    # DropChannel: "gaussian" N(1, p/(1-p)) (as published; won the ablation) or "bernoulli" keep/(1-p)
    noise: Literal["gaussian", "bernoulli"] = "gaussian"
    rate: float = 0.1
    val_samples: int = 512
    seed: int = 0
    progress: bool = True
    supernet: SupernetConfig = field(default_factory=lambda: SupernetConfig(depth_slots=0))
    solve: SolveConfig = field(default_factory=SolveConfig)   # every global rescale: tol, strict, align
    loss_fn: Callable = nn.functional.cross_entropy

    def __post_init__(self):
        super().__post_init__()
        self.check(self.iterations >= 1, "iterations", "at least 1")
        self.check(self.train_steps >= 0, "train_steps", "at least 0")
        self.check(self.draws >= 1, "draws", "at least 1")
        self.check(self.batch_size >= 1, "batch_size", "at least 1")
        self.check(self.val_samples >= 1, "val_samples", "at least 1")
        self.check(self.p_base > 0.0, "p_base", "above 0")
        self.check(0.0 < self.p_max < 1.0, "p_max", "in (0, 1) (survivors are scaled by 1/(1-p))")
        if self.supernet.gates != "markov":
            raise SearchConfigError("FurConfig.supernet.gates must be 'markov' (FUR opens bins by hand), "
                                    f"got {self.supernet.gates!r}")


def set_hard_widths(sn: Supernet, units: dict[int, int]) -> dict[int, int]:
    """Open exactly the bins that fit in ``units`` (rounded down to bins); returns the realised widths."""
    out = {}
    with torch.no_grad():
        for gid, gate in sn.width_gates().items():
            sizes = gate.bin_size.tolist()
            room, on = units[gid] - gate.n_min, []
            for s in sizes:
                keep = room >= s
                on.append(1.0 if keep else 0.0)
                room = room - s if keep else -1  # Markov chain: after the first closed bin all close
            gate.alpha.copy_(torch.tensor(on))
            out[gid] = gate.hard_units()
    return out


@torch.no_grad()
def _val_loss(sn: Supernet, val: Batch, cfg: FurConfig, ctx: dist.DistContext | None = None) -> float:
    ctx = ctx or dist.DistContext()
    val = val.to(ctx.device)
    with dist.autocast(ctx.device, ctx.precision):
        out = val.call(sn.gm)
    return dist.mean(float(task_loss(prediction(out).float(), val, cfg.loss_fn)), val.size, ctx)


def _dropped_loss(sn: Supernet, gid: int, p: float, val: Batch, cfg: FurConfig, gen, ctx=None) -> float:
    gate = sn.width_gates()[gid]
    n = len(gate.bin_of)
    if cfg.noise == "gaussian":  # Network Adjustment's Gaussian DropChannel: same mean and variance
        keep = 1 + math.sqrt(p / (1 - p)) * torch.randn(n, generator=gen)
    else:
        keep = torch.bernoulli(torch.full((n,), 1 - p), generator=gen) / (1 - p)
    handle = gate.register_forward_hook(lambda _m, _i, out: out * keep.to(out.device))
    try:
        return _val_loss(sn, val, cfg, ctx)
    finally:
        handle.remove()


def measure_fur(sn: Supernet, units: dict[int, int], val: Batch, cfg: FurConfig, gen,
                ctx: dist.DistContext | None = None) -> dict[int, float]:
    a = sn.analysis
    share = {g: units[g] * max(a.cost.macs_grad(g, units), 1e-12) for g in units}
    mean_f = float(np.mean(list(share.values())))
    sn.gm.eval()
    base = _val_loss(sn, val, cfg, ctx)
    fur = {}
    for g in units:
        p = min(cfg.p_max, cfg.p_base * mean_f / share[g])
        dl = np.mean([_dropped_loss(sn, g, p, val, cfg, gen, ctx) for _ in range(cfg.draws)]) - base
        fur[g] = float(dl) / (p * share[g])
    sn.gm.train()
    return fur


def adjust(units: dict[int, int], fur: dict[int, float], ref: dict[int, int], rate: float) -> dict[int, int]:
    """Grow the highest-FUR half, shrink the lowest, by ``rate * ref`` decaying linearly with rank."""
    order = sorted(fur, key=lambda g: -fur[g])
    half = max(1, len(order) // 2)
    out = dict(units)
    for i, g in enumerate(order):
        step = max(1, round(rate * ref[g] * (1 - (i if i < half else len(order) - 1 - i) / half)))
        out[g] = units[g] + step if i < half else units[g] - step
    return out


def _train(sn: Supernet, train: Batches, start: int, cfg: FurConfig, ctx: dist.DistContext) -> None:
    weights = sn.weight_parameters()
    opt = torch.optim.SGD(weights, lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    sn.gm.train()
    for p in sn.arch_parameters():
        p.requires_grad_(False)
    try:
        for s in range(start, start + cfg.train_steps):
            batch = train.get(s, ctx.device)
            opt.zero_grad(set_to_none=True)
            with dist.autocast(ctx.device, ctx.precision):
                out = batch.call(sn.gm)
            task_loss(prediction(out).float(), batch, cfg.loss_fn).backward()
            dist.sync_step(weights, sn.gm, ctx, batch.size)
            opt.step()
    finally:
        for p in sn.arch_parameters():
            p.requires_grad_(True)


def fur(a0: Analysis, target: float, data: Any, val_data: Any, cfg: FurConfig = FurConfig(),
        ctx: dist.DistContext | None = None):
    """FUR on an analysed model (``a0``) on ``ctx``'s device and precision (default ``fxadapt.dist.setup()``:
    CPU); returns ``(supernet graph without gates, plan, supernet, history)``."""
    t0 = time.perf_counter()
    ctx = ctx if ctx is not None else dist.setup()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sn = build_supernet(a0, None, cfg.supernet)
    sn.gm.to(ctx.device)
    dist.broadcast_state(sn.gm, ctx)
    a, grow = sn.analysis, target > sn.original.macs()
    train = batches_of(a0, data, cfg.batch_size, cfg.seed, ctx)
    val = batches_of(a0, val_data if val_data is not None else data, cfg.val_samples, cfg.seed + 7919, ctx,
                     train.teacher).get(0, ctx.device)
    bounds = sn.bounds()
    ref = {g: w.n_on for g, w in sn.spec.widths.items()}
    present = {b: 1.0 if on else 0.0 for b, on in sn.spec.depths.items()}
    window = Window(a, target, bounds, grow, cfg.solve, present)
    units = window.fit(dict(ref))
    history, start = [], dict(units)
    bar = _bar(cfg)
    for it in range(cfg.iterations):
        realised = set_hard_widths(sn, units)
        _train(sn, train, it * cfg.train_steps, cfg, ctx)
        scores = measure_fur(sn, realised, val, cfg, gen, ctx)
        history.append({"iteration": it, "macs_ratio": a.cost.macs(realised, present) / target,
                        "fur": {int(g): round(v, 6) for g, v in scores.items()}})
        moved = adjust(realised, scores, ref, cfg.rate * (1 - it / max(cfg.iterations, 1)))
        moved = {g: min(max(n, bounds[g][0]), bounds[g][1]) for g, n in moved.items()}
        units = fit_near(window, moved, ref)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(macs=f"{history[-1]['macs_ratio']:.3f}xT")
    if bar is not None:
        bar.close()
    check_window(a, units, target, grow, cfg.solve, present, sn.original.macs())   # warns off the window
    sn.gm.to("cpu")
    plain, plan = sn.finalize(units, present)
    moves = [{"group": int(g), "initial": int(ref[g]), "start": int(start[g]), "final": int(units[g])}
             for g in units]
    history.append({"seconds": time.perf_counter() - t0, "widths": moves})
    return plain, plan, sn, history


@dataclass(frozen=True)
class Window:
    """The budget window every FUR fit lands in: ``a``'s MACs at ``target`` (within ``solve.tol``, from
    below when shrinking, from above when growing: ``grow``), every group within ``bounds``, the blocks at
    ``present``."""

    a: Analysis
    target: float
    bounds: dict
    grow: bool
    solve: SolveConfig
    present: dict

    def fit(self, widths: dict) -> dict[int, int]:
        """``fxadapt.planning.budget.fit`` from ``widths`` into this window."""
        return fit(self.a, self.target, self.bounds, widths, self.grow, self.solve, self.present)

    def holds(self, units: dict) -> bool:
        return in_window(self.a.cost.macs(units, self.present), self.target, self.grow, self.solve.tol)


def fit_near(window: Window, widths: dict, ref: dict) -> dict[int, int]:
    """``fit`` from the FUR widths; when its greedy repair cannot reach the window from there (groups pinned
    at their bounds), from widths blended toward the uniform ones, ``w^(1-t) ref^t`` for t = 1/4 .. 1: the
    first blend that lands in the window keeps as much of FUR's allocation as the budget allows (the same
    window the data-free solver reaches from the uniform widths)."""
    units = window.fit(widths)
    if window.holds(units):
        return units
    for t in (0.25, 0.5, 0.75, 1.0):
        mixed = {g: max(1, round(widths[g] ** (1 - t) * max(ref[g], 1) ** t)) for g in widths}
        cand = window.fit(mixed)
        if window.holds(cand):
            return cand
    return units


def _bar(cfg: FurConfig):
    if not cfg.progress or not dist.is_main():
        return None
    return tqdm(total=cfg.iterations, desc="fur search", unit="iter")
