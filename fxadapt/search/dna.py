"""DNA-style differentiable search of widths and depths in the elastic supernet.

Alternating optimisation after a weight-only warm-up:
- weight step on a training batch, distilled from the original model: ``(1 - kd) L_task(w) + kd T^2
  KL(p_T(original) || p_T(w))`` (``kd`` 0.5, ``T = kd_temperature`` 4, as every fine-tune here; without
  labels the KL term alone; ``kd=0``: the task loss alone, the default before issue 25; a user ``loss_fn``
  with labels: that loss alone, since only its author knows whether it takes the original's output as a
  target), SGD with momentum
  (AdamW for graphs with attention, ``w_optimizer``) at a cosine learning rate over ``schedule_steps``
  (default ``steps``; ``fxadapt.transform(..., recovery=W)`` sets ``W`` and its fine-tune continues the
  cosine);
- architecture step on a validation batch: ``L_task + lambda * L_budget(E[MACs])``, Adam on the gate
  parameters, which are then projected back to [0, 1].

Budget loss (DMCP/TAS form) with a dead zone: ``r = E[MACs] / T``; zero when ``r`` lies in
``[1 - band, 1]`` (shrink targets) or ``[1, 1 + band]`` (growth targets), ``|log r|`` outside.

Afterwards the gates are discretised (Markov: a bin is kept when its marginal exceeds 0.5; sampled: the
most likely width; a block when its gate exceeds 0.5), repaired to the exact budget by one global rescale
of the searched widths (bisection, as Network Adjustment does, then single-unit repair into the 1% window)
and materialised from the supernet with its trained weights. ``SearchConfig.checkpoint`` saves everything
every ``checkpoint_every`` steps; calling again with the same path resumes and gives the same result as an
uninterrupted run.

Under ``torchrun`` (see ``fxadapt.dist``) each rank takes its slice of every global batch, gradients of
weights and gates and BN statistics are averaged after each backward, so all ranks hold bit-identical
supernets and return the same architecture; only rank 0 writes checkpoints and shows the bar.

With ``sandwich=True`` every weight step trains three hard sub-networks instead of the current soft one
(slimmable networks / DMCP sandwich rule): the largest (all bins and blocks on; cross-entropy), the
smallest (``n_min`` units, no removable block) and one sampled from the gates' Markov chains, the last
two distilled in place from the original model (KL at ``kd_temperature``, 4 since issue 25, was 1), see
``fxadapt.search.sandwich``.

Decisive gates (off by default): ``entropy_weight`` adds ``w * ramp * H(gates)`` to every architecture
step, ``H`` the mean binary entropy of the bins' marginal keep probabilities (``entropy_of="alpha"``: of
the Markov chain's conditional parameters, which can leave a geometric soft ramp of marginals undecided)
and ``ramp`` growing linearly from 0 to 1 over the gate steps; ``harden`` > 0 sets every gate to its hard
value for the last ``harden`` fraction of the steps (no gate steps there; the weights train the
discretised sub-network); ``discretize_by="expected"`` discretises every group to its rounded expected
units instead of the bins whose marginal exceeds 0.5. None is a default: bench/ablation_dna.py measured
them on the quality protocol's digits task and none improved the fine-tuned accuracy beyond seed noise.

Search space: for growth budgets the supernet (``supernet.expand`` wider groups, ``depth_slots`` inactive
block copies); for shrinking budgets the model itself (``elastic_when_shrinking=False``, the default:
the grown space searched no better there and 2-3x slower, bench/ablation_dna.py row x3).

Gate kinds, one option (``SearchConfig(supernet=SupernetConfig(gates=...))``, see ``passes.insert_gates``):
``"markov"`` (DMCP ordered bins, deterministic soft masks), ``"gumbel"`` (FBNetV2: one width per group
sampled every step, straight-through) and ``"topk"`` (MSG-DAS Gumbel-top-k: ``top_k`` widths mixed). With
sampled gates every forward is a discrete sub-network, so the weights are trained for networks that can
actually be cut; the noise of a step is drawn from ``(seed, step)`` (identical on every rank and after a
resume), the temperature anneals exponentially over the gate steps (``temperature``) and, with
``gate_init="budget"``, the logits start as a bump around the uniformly scaled widths that meet the budget
(``Supernet.center``) instead of uniform. Expected MACs use the noise-free choice probabilities and equal
the mean cost of the sampled architectures exactly (Gumbel-max trick; the cost polynomial is multilinear in
independent gates, which is DenseNAS's chained expected cost: every block weighted by its presence and the
expected widths around it).

Where and how precisely a search computes is not a ``SearchConfig`` option: ``fxadapt.transform`` runs it on
``TransformConfig.device`` / ``.precision`` and passes them as a ``fxadapt.dist.DistContext`` (``ctx``);
called directly, ``dna(a, target, data, None, cfg, ctx=fxadapt.dist.setup("cuda", "bf16"))``.

No silent no-ops: ``steps < 1`` raises ``SearchConfigError``; ``warmup >= steps`` shrinks the warm-up to
``steps // 4`` and says so (``note`` in the last history entry, which also lists how far every gate moved:
initial vs final expected units per group and presence per block).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from tqdm import tqdm

from fxadapt import dist
from fxadapt.errors import SearchConfigError
from fxadapt.options import RUN_OPTIONS, Options
from fxadapt.planning.budget import SolveConfig, fit
from fxadapt.planning.solver import check_window
from fxadapt.search.loop import (
    GateSchedule,
    distil_step,
    gate_optimizer,
    gate_search,
    noise,
    prepare,
    tau_at,
    teacher_of,
    train_step,
)
from fxadapt.search.losses import arch_penalty, budget_loss, gate_entropy, harden_gates, penalty  # noqa: F401
from fxadapt.search.sandwich import sandwich_step
from fxadapt.search.supernet import Supernet, SupernetConfig
from fxadapt.train.data import Batches

if TYPE_CHECKING:

    from fxadapt.analysis.analyze import Analysis


@dataclass(frozen=True)
class SearchConfig(Options):
    """Every option of the DNA search (``TransformConfig.search``); checked at construction."""

    error = SearchConfigError
    moved = RUN_OPTIONS

    steps: int = 300
    warmup: int = 50
    batch_size: int = 64                    # the global batch (split over the ranks under torchrun)
    w_lr: float = 0.02                      # SGD's learning rate
    # weight steps: "sgd" (momentum), "adamw" (lr adamw_lr), "auto": AdamW when the graph has attention
    # (softmax / SDPA: transformers are trained with it; SGD at 0.02 wrecked a GPT-2 in bench_lm_quality)
    w_optimizer: Literal["auto", "sgd", "adamw"] = "auto"
    adamw_lr: float = 1e-3
    w_momentum: float = 0.9
    weight_decay: float = 5e-4
    a_lr: float = 0.05
    # the gate steps' optimizer: "adam" (per entry), "shared" (one second moment for all gates: keeps the
    # task gradient's differences between groups, fxadapt.search.loop.SharedAdam)
    a_optimizer: Literal["adam", "shared"] = "adam"
    budget_weight: float = 10.0
    band: float = 0.03
    seed: int = 0
    progress: bool = True
    checkpoint: str | None = None
    checkpoint_every: int = 50
    stop_after: int | None = None           # stop (checkpointed) after this many steps: for resume tests
    sandwich: bool = False                  # sandwich rule + in-place distillation in weight steps
    entropy_weight: float = 0.0             # gate-entropy penalty in arch steps, ramped 0 -> this
    entropy_of: Literal["marginals", "alpha"] = "marginals"        # of each bin's P_k / of p_k
    discretize_by: Literal["threshold", "expected"] = "threshold"  # bins with P_k > 0.5 / round(E[units])
    harden: float = 0.0                     # last fraction of steps: gates frozen hard, weights only
    # weight steps: (1 - kd) L_task + kd T^2 KL_T to the original (T = kd_temperature); 0: L_task alone
    kd: float = 0.5
    kd_temperature: float = 4.0             # the distillation's T (also the sandwich rule's)
    # the weight steps' cosine runs over this many steps (None: steps); transform(recovery=W) sets W
    schedule_steps: int | None = None
    temperature: tuple[float, float] = (1.0, 0.1)   # sampled gates: Gumbel tau, first -> last gate step
    gate_init: Literal["budget", "uniform"] = "budget"   # sampled gates: around uniform scaling to the target
    # grow the supernet (supernet.expand, depth slots) also for shrinking budgets (DNA's condense-and-expand
    # space); off: the model itself is the supernet when shrinking, which measured as good and 2-3x faster
    elastic_when_shrinking: bool = False
    arch_every: int = 1                     # a gate step after every n-th weight step (after the warm-up)
    # "frozen": no weight step at all, ``steps`` gate steps on the inherited weights (gate_search); the
    # whole weight-update budget is left to the fine-tune (issue 15, bench/ablation_dna.py row w0)
    weights: Literal["train", "frozen"] = "train"
    # without val_data: the fraction of ``data`` the gate steps read and the weight steps never see
    holdout: float = 0.0
    # Gumbel-top-2 (MSG-DAS) gates won bench/ablation_dna.py over DMCP Markov bins (gates="markov")
    supernet: SupernetConfig = field(default_factory=lambda: SupernetConfig(gates="topk"))
    solve: SolveConfig = field(default_factory=SolveConfig)   # the final rescale: tol, strict, align
    loss_fn: Callable = nn.functional.cross_entropy

    def __post_init__(self):
        super().__post_init__()   # the Literal fields
        validate(self)            # a bad option fails where it is written, not steps into a search


@dataclass
class SearchState:
    step: int = 0
    history: list = field(default_factory=list)


def validate(cfg: SearchConfig) -> None:
    """Every option of ``cfg`` is one the search can run (a ``SearchConfigError`` saying which is not; the
    ``Literal`` fields are checked by ``Options``)."""
    cfg.check(cfg.steps >= 1, "steps", "at least 1")
    if cfg.supernet.gates != "markov" and (cfg.sandwich or cfg.entropy_of == "alpha"):
        raise SearchConfigError(f"SearchConfig.sandwich and entropy_of='alpha' need Markov gates; got "
                                f"supernet.gates={cfg.supernet.gates!r}: pass "
                                f"SearchConfig(supernet=SupernetConfig(gates='markov'), ...)")
    cfg.check(cfg.arch_every >= 1, "arch_every", "at least 1")
    cfg.check(0.0 <= cfg.harden < 1.0, "harden", "in [0, 1)")
    cfg.check(cfg.batch_size >= 1, "batch_size", "at least 1")
    cfg.check(cfg.checkpoint_every >= 1, "checkpoint_every", "at least 1")
    cfg.check(cfg.warmup >= 0, "warmup", "at least 0")
    cfg.check(0.0 <= cfg.holdout < 1.0, "holdout", "in [0, 1)")
    cfg.check(0.0 <= cfg.kd <= 1.0, "kd", "in [0, 1] (the distillation loss's weight)")
    cfg.check(cfg.kd_temperature > 0.0, "kd_temperature", "above 0")
    cfg.check(cfg.schedule_steps is None or cfg.schedule_steps >= cfg.steps, "schedule_steps",
              f"None or at least steps ({cfg.steps})")
    if cfg.weights == "frozen" and (cfg.sandwich or cfg.harden):
        raise SearchConfigError("SearchConfig(weights='frozen') takes no weight step: sandwich and harden "
                                "train weights; pass weights='train' to use them")


def effective_warmup(cfg: SearchConfig) -> tuple[int, str | None]:
    """The warm-up actually used, and the note saying it was shrunk (see module docstring)."""
    validate(cfg)
    if cfg.warmup < cfg.steps:
        return cfg.warmup, None
    w = cfg.steps // 4
    return w, f"warmup {cfg.warmup} >= steps {cfg.steps}: warm-up shrunk to {w} so the gates are searched"


ATTENTION_OPS = (torch.ops.aten._softmax.default, torch.ops.aten.softmax.int,
                 torch.ops.aten.scaled_dot_product_attention.default)


def optimizer_kind(cfg: SearchConfig, gm: torch.fx.GraphModule) -> Literal["sgd", "adamw"]:
    """``SearchConfig.w_optimizer`` resolved: ``"auto"`` is AdamW where ``gm`` has attention (SGD wrecks
    transformers), SGD elsewhere."""
    if cfg.w_optimizer == "sgd" or cfg.w_optimizer == "adamw":
        return cfg.w_optimizer
    return "adamw" if any(n.target in ATTENTION_OPS for n in gm.graph.nodes) else "sgd"


def weight_optimizer(sn: Supernet, cfg: SearchConfig) -> tuple[torch.optim.Optimizer, float]:
    """The weight steps' optimizer and its peak learning rate (see ``SearchConfig.w_optimizer``)."""
    if optimizer_kind(cfg, sn.analysis.gm) == "adamw":
        return torch.optim.AdamW(sn.weight_parameters(), lr=cfg.adamw_lr, weight_decay=cfg.weight_decay), \
                cfg.adamw_lr
    return torch.optim.SGD(sn.weight_parameters(), lr=cfg.w_lr, momentum=cfg.w_momentum,
                           weight_decay=cfg.weight_decay), cfg.w_lr


def _save(path: str, sn: Supernet, opts, state: SearchState) -> None:
    tmp = path + ".tmp"
    torch.save({"model": sn.gm.state_dict(), "opts": [o.state_dict() for o in opts], "step": state.step,
                "history": state.history, "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def _load(path: str, sn: Supernet, opts, state: SearchState) -> None:
    ck = torch.load(path, weights_only=False, map_location="cpu")
    sn.gm.load_state_dict(ck["model"])
    for o, s in zip(opts, ck["opts"]):
        o.load_state_dict(s)
    state.step, state.history = ck["step"], ck["history"]
    torch.set_rng_state(ck["rng"])


def run_search(sn: Supernet, train: Batches, val: Batches, target: float | None, grow: bool,
               cfg: SearchConfig, ctx: dist.DistContext | None = None, teacher: nn.Module | None = None,
               extra: Callable[[], torch.Tensor] | None = None) -> SearchState:
    """The alternating loop (resumable); leaves trained weights and gates in ``sn``. ``extra()`` is added to
    every architecture step's loss (a latency term); ``target=None``: no MAC budget loss."""
    ctx = ctx or dist.DistContext()
    warmup, _ = effective_warmup(cfg)
    if teacher is None and (cfg.kd > 0 or cfg.sandwich):   # the original, frozen (a label-free run's own)
        teacher = train.teacher if isinstance(train.teacher, nn.Module) else teacher_of(sn.original, ctx)
    sn.gm.to(ctx.device).train()
    w_opt, w_lr = weight_optimizer(sn, cfg)
    a_opt = gate_optimizer(sn, cfg)
    state = SearchState()
    opts = [w_opt] + ([a_opt] if a_opt else [])
    if cfg.checkpoint and os.path.exists(cfg.checkpoint):
        _load(cfg.checkpoint, sn, opts, state)
    else:
        torch.manual_seed(cfg.seed)
        dist.broadcast_state(sn.gm, ctx)
    bar = _bar(cfg, state.step, "dna search")
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, state.step + cfg.stop_after)
    hard_from = cfg.steps - int(round(cfg.harden * cfg.steps)) if cfg.harden > 0 else cfg.steps
    loop = _Loop(sn, train, val, target, grow, cfg, ctx, teacher, extra, w_opt, w_lr, a_opt,
                 warmup, max(hard_from, warmup))
    while state.step < end:
        entry = loop.step(state.step)
        state.history.append(entry)
        state.step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.3f}", macs=f"{entry['macs_ratio']:.3f}xT",
                            H=f"{entry['entropy']:.3f}")
        if cfg.checkpoint and (state.step % cfg.checkpoint_every == 0 or state.step == end):
            if dist.is_main():
                _save(cfg.checkpoint, sn, opts, state)
            dist.barrier(ctx)
    if bar is not None:
        bar.close()
    sn.resample(None)
    return state


@dataclass
class _Loop:
    """One step of the alternating loop: a weight step, then (between the warm-up and the hardening) a gate
    step; returns the step's history entry."""

    sn: Supernet
    train: Batches
    val: Batches
    target: float | None
    grow: bool
    cfg: SearchConfig
    ctx: dist.DistContext
    teacher: nn.Module | None
    extra: Callable | None
    w_opt: torch.optim.Optimizer
    w_lr: float
    a_opt: torch.optim.Optimizer | None
    warmup: int
    hard_from: int

    def step(self, s: int) -> dict:
        sn, cfg = self.sn, self.cfg
        if s == self.hard_from:
            harden_gates(sn)
        for g in self.w_opt.param_groups:
            g["lr"] = self.w_lr * 0.5 * (1 + math.cos(math.pi * s / (cfg.schedule_steps or cfg.steps)))
        tau = tau_at(cfg, s, self.warmup, self.hard_from)
        if sn.sampled:
            sn.resample(noise(cfg, s, 0), tau)
        if cfg.sandwich and self.teacher is not None:
            loss = sandwich_step(sn, self.train.get(s, self.ctx.device), self.w_opt, cfg, self.ctx,
                                 self.teacher, s)
        else:
            loss = distil_step(sn, self.train.get(s, self.ctx.device), self.w_opt, cfg, self.ctx,
                               self.teacher)
        arch = float("nan")
        w = self.warmup
        if self.a_opt is not None and w <= s < self.hard_from and (s - w) % cfg.arch_every == 0:
            ramp = (s - w + 1) / max(self.hard_from - w, 1)
            if sn.sampled:
                sn.resample(noise(cfg, s, 1), tau)
            arch = train_step(sn, self.val.get(s, self.ctx.device), self.a_opt, cfg, self.ctx,
                              sn.weight_parameters(),
                              lambda ramp=ramp: penalty(sn, self.target, self.grow, cfg, ramp, self.extra))
            sn.project()
        with torch.no_grad():
            ratio = float(sn.expected_macs()) / self.target if self.target else float("nan")
            m_entropy = float(gate_entropy(sn))
        return {"step": s, "loss": loss, "val_loss": arch, "macs_ratio": ratio,
                "entropy": sn.entropy(), "marginal_entropy": m_entropy}


def _bar(cfg, start: int, desc: str):
    if not cfg.progress or not dist.is_main():
        return None
    return tqdm(total=cfg.steps, initial=start, desc=desc, unit="step")


def discretize(sn: Supernet, target: float, grow: bool, solve: SolveConfig = SolveConfig(),
               by: str = "threshold"):
    """Hard widths/blocks from the gates, rescaled to the budget window (see module docstring).
    ``by="expected"`` takes every group's expected units (rounded) instead of the bins whose marginal
    exceeds 0.5: with a geometric ramp of marginals (all ``p_k`` near one value ``c < 1``) the threshold
    keeps only ``log 0.5 / log c`` bins while the budget loss counted the whole tail."""
    if by not in ("threshold", "expected"):
        raise SearchConfigError(f"SearchConfig.discretize_by must be 'threshold' or 'expected', got {by!r}")
    units, present = sn.hard()
    bounds = sn.bounds()
    if by == "expected":
        with torch.no_grad():
            units = {gid: min(max(round(float(g.expected_units())), bounds[gid][0]), bounds[gid][1])
                     for gid, g in sn.width_gates().items()}
    base = {gid: max(units[gid], 1) for gid in bounds}
    units = fit(sn.analysis, target, bounds, base, grow, solve, present)
    check_window(sn.analysis, units, target, grow, solve, present, sn.original.macs())  # warns off the window
    return units, present


@torch.no_grad()
def gate_moves(sn: Supernet, units: dict[int, int], present: dict[int, float]) -> dict:
    """How far every gate moved: initial vs final expected units (and the width chosen) per group,
    initial vs final presence per removable block."""
    widths = [{"group": int(g), "initial": int(sn.spec.widths[g].n_on),
               "final": round(float(gate.expected_units()), 3), "chosen": int(units[g])}
              for g, gate in sn.width_gates().items()]
    depths = [{"block": int(b), "initial": float(sn.spec.depths[b]), "final": round(float(gate()), 3),
               "chosen": float(present[b])} for b, gate in sn.depth_gates().items()]
    return {"gates": widths, "depth_gates": depths}


def dna(a0: Analysis, target: float, data: Any, val_data: Any, cfg: SearchConfig = SearchConfig(),
        ctx: dist.DistContext | None = None):
    """DNA on an analysed model (``a0``): supernet, search, discretise, on ``ctx``'s device and precision
    (default ``fxadapt.dist.setup()``: CPU). Returns ``(supernet graph without gates, plan, supernet,
    state)``; ``fxadapt.passes.materialize.apply_plan`` turns the first two into the adapted model (``None``
    graph and plan when the run stopped early, see ``SearchConfig.stop_after``)."""
    t0 = time.perf_counter()
    _, note = effective_warmup(cfg)
    ctx = ctx if ctx is not None else dist.setup()
    grow = target > a0.macs()
    sn, train, val = prepare(a0, target, data, val_data, cfg, ctx)
    if cfg.weights == "frozen":   # gates only, on the inherited weights
        state = SearchState(cfg.steps,
                            gate_search(sn, val, target, grow, cfg, ctx, GateSchedule(anneal=True)))
        note = None
    else:
        state = run_search(sn, train, val, target, grow, cfg, ctx)   # its teacher: the original (a0)
    if state.step < cfg.steps:
        return None, None, sn, state
    units, present = discretize(sn, target, grow, cfg.solve, cfg.discretize_by)
    sn.gm.to("cpu")
    plain, plan = sn.finalize(units, present)
    last = {"seconds": time.perf_counter() - t0, **gate_moves(sn, units, present)}
    state.history.append(last | ({"note": note} if note else {}))
    return plain, plan, sn, state
