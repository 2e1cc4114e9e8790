"""Importance scores of the units and blocks of an elastic supernet, on calibration batches.

Every unit ``j`` of group ``g`` multiplies its channels by a mask ``m_j`` (``build_supernet`` at
``expand=1``). With the student's output ``s(x)``, the original's ``t(x)`` and a target drawn from the
original, ``y ~ softmax(t(x))`` (``loss="kl"``) or ``y = t(x) + N(0, 1)`` (``"mse"``), the per-sample loss is
``l_i = CE(s(x_i), y_i)`` (``0.5 |s - y|^2``) and ``z_ij = m_j dl_i/dm_j`` (summed over the unit's sites and
the positions that count, ``fxadapt.search.positions``):

    fisher:     S_j = 0.5 sum_i z_ij^2 / N     (removing j raises the KL to the original by ~S_j: diag Fisher)
    taylor:     S_j = |sum_i z_ij| / N         (first order; zero at the original itself)
    activation: S_j = sum_i |a_ij| / N         (Minitron)
    ablation:   S_j = D(m_j = 0) - D           (exact, one forward per unit, ``fxadapt.search.replay``
                                                re-running only what the unit reaches, a group's units
                                                as copies of the batch in one run)
    hybrid:     ablation in groups of at most ``EXACT_UNITS`` surviving units whose units are blocks of
                channels (granularity > 1: heads, kv groups, experts), fisher in every other group

and a removable block scores the exact increase of ``D`` when bypassed. ``D`` is the divergence from the
original summed over samples (and positions) over ``N``. Under ``torchrun`` every rank scores its shard of
the calibration batches and the sums over samples (and ``N``) are all-reduced (``all_sum``) before any
division, so every rank holds the same scores and takes the same allocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from fxadapt import dist
from fxadapt.passes.insert_gates import GATE_ROOT
from fxadapt.search.positions import divergence, drawn_targets, position_mask, sample_loss, site_weights
from fxadapt.search.replay import Replay
from fxadapt.search.supernet import Supernet
from fxadapt.train.data import Batch, Layout, prediction

if TYPE_CHECKING:
    from fxadapt.search.importance import ImportanceConfig

EXACT_UNITS = 16    # kind="hybrid": groups of blocks with at most this many surviving units: ablation


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
    ``record``, collects per-sample ``z_ij`` (``grad``) or ``sum |a_ij|`` (``act``) at every site, weighted
    by ``pad`` (the batch's ``position_mask``, set per batch)."""

    def __init__(self, sn: Supernet, masks: Masks, record: bool = False):
        self.sn, self.masks, self.record = sn, masks, record
        self.z: dict[int, torch.Tensor] = {}
        self.batch = 0          # samples in the batch being recorded (rows of z)
        self.pad: torch.Tensor | None = None
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

        def per_unit(t: torch.Tensor, axis: int) -> torch.Tensor:   # (B, units): summed over other axes
            w = site_weights(t, axis, self.pad)
            t = t if w is None else t * w
            other = [d for d in range(1, t.dim()) if d != axis]
            per = (t.sum(other) if other else t).float()
            per = per if axis != 0 else per.unsqueeze(0)
            idx = site.index.to(per.device)
            pos = idx >= 0
            return per.new_zeros(per.shape[0], units).index_add_(1, idx[pos], per[:, pos])

        def hook(_m, inputs, out):
            x = inputs[0].detach()
            axis = site.axis - site.ndim + x.dim()
            self.act[gid] = self.act.get(gid, 0) + per_unit(x.abs(), axis).sum(0)
            if out.requires_grad:
                out.register_hook(lambda g: self._add_z(gid, per_unit(x * g, axis)))
        return hook

    def _add_z(self, gid: int, z: torch.Tensor) -> None:
        b = self.batch or z.shape[0]
        if z.shape[0] != b:     # a site whose rows are (sample, position) flattened, as in Conv1D's addmm
            z = (z.view(b, -1, z.shape[1]).sum(1) if z.shape[0] % b == 0
                 else (z.sum(0) / b).expand(b, -1))
        self.z[gid] = self.z[gid] + z if gid in self.z else z


def as_batch(b: Any) -> Batch:
    """A calibration batch as a ``Batch``: a ``Batch`` as it is, a tensor as the model's one input."""
    if isinstance(b, Batch):
        return b
    return Layout().batch((b,) if isinstance(b, torch.Tensor) else b)


@dataclass
class Calibration:
    """Calibration batches on the device with the original's predictions and their position masks, computed
    once (the original does not change between the iterations' scorings)."""

    batches: list[Batch]
    t_outs: list[torch.Tensor]
    pads: list[torch.Tensor | None]

    @property
    def n(self) -> int:
        return sum(b.size for b in self.batches)

    @classmethod
    @torch.no_grad()
    def of(cls, calib: Any, teacher: nn.Module, device: str = "cpu") -> Calibration:
        """``calib`` (a ``Calibration`` as it is, or a list of ``Batch`` es / input tensors) prepared."""
        if isinstance(calib, Calibration):
            return calib
        bs = [as_batch(b).to(device) for b in calib]
        return cls(bs, [prediction(b.call(teacher)).float() for b in bs], [position_mask(b) for b in bs])


def all_sum(values: list[torch.Tensor], ctx: dist.DistContext | None) -> list[torch.Tensor]:
    """``values`` summed over the ranks (one float64 ``all_reduce``); as they are in one process.

    >>> all_sum([torch.ones(2), torch.tensor(3.0)], dist.DistContext())[1]
    tensor(3.)
    """
    if ctx is None or not ctx.active or not values:
        return values
    flat = torch.cat([v.detach().reshape(-1).double().cpu() for v in values])
    flat = flat.cuda() if tdist.get_backend() == "nccl" else flat
    tdist.all_reduce(flat)
    out, pos = [], 0
    for v in values:
        out.append(flat[pos:pos + v.numel()].view_as(v).to(v.device, v.dtype))
        pos += v.numel()
    return out


def score(sn: Supernet, masks: Masks, teacher: nn.Module, calib: Any, cfg: ImportanceConfig, rnd: int,
          device: str = "cpu", ctx: dist.DistContext | None = None
          ) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Per-unit scores of every gated group and the bypass score of every surviving block (module
    docstring) on the ``calib`` batches (``Batch`` es, or input tensors); ``rnd`` seeds the drawn targets;
    ``ctx``: the world whose ranks' sums are all-reduced. ``calib`` may be a ``Calibration``."""
    cal = Calibration.of(calib, teacher, device)
    blocks = block_scores(sn, masks, teacher, cal, cfg, device, ctx) if cfg.depth else {}
    if cfg.kind == "ablation":
        return ablation_scores(sn, masks, teacher, cal, cfg, device, None, ctx), blocks
    narrow = exact_groups(sn, masks) if cfg.kind == "hybrid" else []
    units = ({} if len(narrow) == len(masks.units)    # hybrid, every group narrow: no gradient pass
             else gradient_scores(sn, masks, teacher, cal, cfg, rnd, device, ctx))
    # narrow groups: the exact increase, in the same currency as fisher's
    units.update(ablation_scores(sn, masks, teacher, cal, cfg, device, narrow, ctx))
    return units, blocks


def exact_groups(sn: Supernet, masks: Masks) -> list[int]:
    """``kind="hybrid"``'s exactly scored groups: at most ``EXACT_UNITS`` surviving units, each a block of
    channels (granularity > 1). Removing a head is a large step that fisher's quadratic estimate misranks
    (the users' LM protocol, fisher everywhere − hybrid, paired val perplexity: +0.08 / +0.43 / +2.2 at
    0.5 / 0.25 / 0.1x; bench/bench_lm_quality.py); single channels of narrow CNN layers are better served by
    fisher (the users' image protocol: +1.6 / +2.7 / +5.4 val points at 0.5 / 0.25 / 0.1x over ablating
    them; bench/users_protocol.py)."""
    groups = sn.analysis.groups
    return [g for g, k in masks.units.items() if k.sum() <= EXACT_UNITS and groups[g].granularity > 1]


def gradient_scores(sn: Supernet, masks: Masks, teacher: nn.Module, calib: Any, cfg: ImportanceConfig,
                    rnd: int, device: str = "cpu", ctx: dist.DistContext | None = None
                    ) -> dict[int, np.ndarray]:
    """``kind`` fisher / taylor / activation (``hybrid``: fisher) per unit of every group."""
    sn.gm.eval()
    cal = Calibration.of(calib, teacher, device)
    weights = sn.weight_parameters()
    acc: dict[int, torch.Tensor] = {}
    n = 0
    with Hooks(sn, masks, record=True) as h:
        for k, (b, t_out, pad) in enumerate(zip(cal.batches, cal.t_outs, cal.pads)):
            h.z, h.batch, h.pad = {}, b.size, pad
            out = prediction(b.call(sn.gm)).float()
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * rnd + k)
            if cfg.kind != "activation":
                sample_loss(out, drawn_targets(t_out, cfg.loss, gen), cfg.loss, h.pad).backward()
            for gid, z in h.z.items():
                v = z.sum(0) if cfg.kind == "taylor" else z.pow(2).sum(0)
                acc[gid] = acc[gid] + v if gid in acc else v
            n += b.size
            for p in weights:
                p.grad = None
    sums = h.act if cfg.kind == "activation" else acc
    gids = sorted(sums)
    *reduced, total = all_sum([sums[g] for g in gids] + [torch.tensor(float(n))], ctx)
    n = int(total) if ctx is not None and ctx.active else n
    sums = dict(zip(gids, reduced))
    if cfg.kind == "activation":
        units = {g: (v / n).double().cpu().numpy() for g, v in sums.items()}
    elif cfg.kind == "taylor":
        units = {g: (v / n).abs().double().cpu().numpy() for g, v in sums.items()}
    else:
        units = {g: (0.5 * v / n).double().cpu().numpy() for g, v in sums.items()}
    return {g: units.get(g, np.zeros(len(k))) for g, k in masks.units.items()}


class Ablation:
    """``D`` of the masked supernet with one group's (or block's) gate changed at a time: the calibration
    batches recorded once under ``masks`` (``Replay``), each change re-running what its gate reaches (the
    removals of one group's units: copies of each batch in one run, ``removed``). Sums over samples are
    collected per change and divided by the world's ``N`` in ``result``."""

    def __init__(self, sn: Supernet, masks: Masks, teacher: nn.Module, calib: Any, cfg: ImportanceConfig,
                 device: str = "cpu"):
        self.sn, self.masks, self.loss = sn, masks, cfg.loss
        cal = Calibration.of(calib, teacher, device)
        self.t_outs, self.pads, self.n = cal.t_outs, cal.pads, cal.n
        with Hooks(sn, masks):
            slices: dict = {}     # one compiled slice per gate, shared by the batches
            self.plays = [Replay(sn.gm, (b.inputs.args, b.inputs.kwargs), slices=slices) for b in cal.batches]
        self.base = self._sum(p.out for p in self.plays)

    def _sum(self, outs) -> float:
        return sum(divergence(prediction(o).float(), t, self.loss, w)
                   for o, t, w in zip(outs, self.t_outs, self.pads))

    def changed(self, m: Masks, gate: str) -> float:
        """Sum over the local samples of the divergence under ``m``, which differs from the recorded masks
        in the gate ``gate`` (``"w3"``, ``"d1"``) only."""
        with Hooks(self.sn, m):
            return self._sum(p.run([f"{GATE_ROOT}.{gate}"]) for p in self.plays)

    def removed(self, g: int, units: list[int]) -> list[float]:
        """``changed`` for each of ``units`` of group ``g`` removed alone, as copies of the batches
        (``Replay.run_copies``: one run of the region per batch and chunk of copies)."""
        target, keep = f"{GATE_ROOT}.w{g}", self.masks.units[g]
        most = min(p.copies([target]) for p in self.plays)
        if most >= 2 and len(units) >= 2:
            try:
                return self._copies(target, keep, units, most)
            except Exception:   # noqa: BLE001 - a graph the probe misread: one change per run instead
                pass
        m = self.masks
        return [self.changed(Masks({**m.units, g: _without(keep, j)}, m.blocks), f"w{g}") for j in units]

    def _copies(self, target: str, keep: np.ndarray, units: list[int], most: int) -> list[float]:
        raw = self.sn.gm.get_submodule(target)()    # without Hooks' keep mask: each copy applies its own
        sums = []
        for lo in range(0, len(units), most):
            values = [raw * torch.as_tensor(_without(keep, j), dtype=torch.float32).to(raw.device)
                      for j in units[lo:lo + most]]
            per = [0.0] * len(values)
            for p, t, w in zip(self.plays, self.t_outs, self.pads):
                out, k = prediction(p.run_copies([target], values)), len(values)
                rows = out.shape[0] // k
                for c in range(k):
                    per[c] += divergence(out[c * rows:(c + 1) * rows].float(), t, self.loss, w)
            sums += per
        return sums

    def result(self, sums: dict, ctx: dist.DistContext | None) -> dict:
        """``max(D(change) - D, 0)`` per key of ``sums`` (local divergence sums), all-reduced over ``ctx``."""
        keys = list(sums)
        vals = torch.tensor([self.base, *(sums[k] for k in keys), float(self.n)], dtype=torch.float64)
        if ctx is not None and ctx.active:
            vals = all_sum([vals], ctx)[0]
        base, *per, n = (float(v) for v in vals)
        return {k: max(s / n - base / n, 0.0) for k, s in zip(keys, per)}


def _without(keep: np.ndarray, j: int) -> np.ndarray:
    k = keep.copy()
    k[j] = False
    return k


@torch.no_grad()
def ablation_scores(sn: Supernet, masks: Masks, teacher: nn.Module, calib: Any, cfg: ImportanceConfig,
                    device: str = "cpu", groups: list[int] | None = None, ctx: dist.DistContext | None = None
                    ) -> dict[int, np.ndarray]:
    """Per surviving unit of ``groups`` (default: all), the exact divergence increase of removing it alone
    (0 for removed units)."""
    sn.gm.eval()
    if groups is not None and not groups:
        return {}
    ab = Ablation(sn, masks, teacher, calib, cfg, device)
    sums = {}
    for g, keep in masks.units.items():
        if groups is not None and g not in groups:
            continue
        units = [int(j) for j in np.flatnonzero(keep)]
        sums.update({(g, j): v for j, v in zip(units, ab.removed(g, units))})
    got = ab.result(sums, ctx)
    out = {g: np.zeros(len(keep)) for g, keep in masks.units.items() if groups is None or g in groups}
    for (g, j), v in got.items():
        out[g][j] = v
    return out


@torch.no_grad()
def block_scores(sn: Supernet, masks: Masks, teacher: nn.Module, calib: Any, cfg: ImportanceConfig,
                 device: str = "cpu", ctx: dist.DistContext | None = None) -> dict[int, float]:
    """Per surviving block, ``D`` with it bypassed minus without."""
    alive = [b for b, on in masks.blocks.items() if on]
    if not alive:
        return {}
    sn.gm.eval()
    ab = Ablation(sn, masks, teacher, calib, cfg, device)
    return ab.result({b: ab.changed(Masks(masks.units, {**masks.blocks, b: False}), f"d{b}") for b in alive},
                     ctx)
