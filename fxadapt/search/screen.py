"""Axis screening for the importance strategy (``ImportanceConfig.screen``): a handful of allocations under
different axis constraints, each given a short distillation, ranked by validation distillation loss; the
best one continues.

Axes. Every prunable group of the analysis gets one axis (``axes_of``). In a model with attention
(``scaled_dot_product_attention`` / ``softmax`` in the graph): ``experts`` (a routed expert axis,
``Group.top_k``), ``heads`` (every member inside one residual block whose body holds the attention op: q/k/v
and output-projection widths, per head or per head dimension), ``mlp`` (inside one block without attention:
the MLP's inner width), ``hidden`` (spanning blocks and carrying norm parameters: the residual stream), else
``other``. In a model without attention, the groups' producers' spatial sizes order the stages:
``stage0`` (the largest resolution) ... ``stageN``.

Candidates (``candidates``): sets of axes held at full width, the transformer set in this order

    all free | hidden held (heads + MLP) | hidden and heads held (MLP only) | heads held (hidden + MLP)

and for CNNs: all free | the first half of the stages held | the second half held; after "all free" come
the same all-free allocation under each floor of ``ImportanceConfig.floors`` (every group at least that
fraction of its uniformly scaled width: from importance's own widths at 0 to Minitron's homogeneous widths
at 1, the data choosing how far the widths may concentrate). A held axis is
``Group.min_units = units`` on its groups (the mechanism of the user's ``min_width``,
``fxadapt.analysis.hold``), which the allocator's bounds (``fxadapt.planning.solver.limited``) respect.
Candidates whose held groups leave the target out of reach (the others at their floors, MACs above the
target) or that hold nothing present are dropped.

Budget. With ``k`` candidates and ``S = ImportanceConfig.steps`` weight steps, each candidate runs the
importance strategy with ``s = S // (2k)`` steps; the one with the lowest

    L_val = (1 / n) sum_i KL(t(x_i) || s(x_i))     (summed over positions; ``0.5 |s - t|^2`` for ``"mse"``)

on validation batches (``val_data``, else a held-out tail of tensor calibration data, else other batches
of ``data``) continues ``S - k s`` more distillation steps: ``S`` weight steps in all, every one a history
entry with a ``"step"`` key. The last history entry lists the candidates (``"screen"``) and a note the
report prints.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fxadapt import dist
from fxadapt.passes.insert_gates import strip_gates
from fxadapt.planning.solver import unit_bounds
from fxadapt.search.importance import ImportanceConfig, importance, train
from fxadapt.search.loop import batches_of, teacher_of
from fxadapt.search.positions import divergence
from fxadapt.search.scores import Hooks, Masks, as_batch
from fxadapt.train.data import as_mapping, as_tensors, prediction

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis
    from fxadapt.ir.plan_types import Plan

ATTENTION = ("scaled_dot_product_attention", "softmax", "_softmax")
TRANSFORMER_SETS = (("all", ()), ("heads+mlp", ("hidden",)), ("mlp", ("hidden", "heads")),
                    ("hidden+mlp", ("heads",)))


def _has_attention(a: Analysis) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] in ATTENTION
               for n in a.gm.graph.nodes)


def _stage(a: Analysis, g, nodes: dict) -> int | None:
    """The spatial size (product of the axes after the channel axis) of ``g``'s producer's output."""
    for m in g.members:
        if m.site.role == "out" and m.site.node_name in nodes:
            val = nodes[m.site.node_name].meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() >= 3:
                return int(np.prod(val.shape[2:]))
    return None


def axes_of(a: Analysis) -> dict[int, str]:
    """The axis of every prunable group of ``a`` (module docstring).

    >>> import torch, fxadapt
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    ...                         torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    >>> axes_of(fxadapt.analyze(m, (torch.randn(1, 3, 8, 8),)))
    {0: 'stage0', 1: 'stage1'}
    """
    nodes = {n.name: n for n in a.gm.graph.nodes}
    if not _has_attention(a):
        size = {g.id: _stage(a, g, nodes) for g in a.prunable}
        order = sorted({s for s in size.values() if s is not None}, reverse=True)
        return {g: f"stage{order.index(s)}" if s is not None else "other" for g, s in size.items()}
    bodies = [(set(b.body), any(_attention_node(nodes.get(n)) for n in b.body)) for b in a.blocks]
    out = {}
    for g in a.prunable:
        names = {m.site.node_name for m in g.members}
        inside = [att for body, att in bodies if names <= body]
        if g.top_k is not None:
            out[g.id] = "experts"
        elif inside:
            out[g.id] = "heads" if inside[0] else "mlp"
        elif any(m.site.role == "norm" for m in g.members):
            out[g.id] = "hidden"
        else:
            out[g.id] = "other"
    return out


def _attention_node(n) -> bool:
    return n is not None and n.op == "call_function" and \
        getattr(n.target, "__name__", "").split(".")[0] in ATTENTION


def candidates(axes: dict[int, str]) -> list[tuple[str, tuple[str, ...]]]:
    """``(name, held axes)`` in screening order (module docstring), those holding an absent axis or
    holding every axis dropped."""
    present = set(axes.values())
    if any(v.startswith("stage") for v in present):
        stages = sorted((v for v in present if v.startswith("stage")), key=lambda v: int(v[5:]))
        half = max(1, len(stages) // 2)
        sets = [("all", ()), ("deep", tuple(stages[:half])), ("shallow", tuple(stages[half:]))]
    else:
        sets = list(TRANSFORMER_SETS)
    return [(name, hold) for name, hold in sets if set(hold) <= present and present - set(hold)]


def held(a: Analysis, axes: dict[int, str], hold: tuple[str, ...]) -> Analysis:
    """``a`` with every group of the ``hold`` axes at full width (``min_units = units``)."""
    return dataclasses.replace(a, groups=[dataclasses.replace(g, min_units=g.units)
                                          if axes.get(g.id) in hold else g for g in a.groups])


def reachable(a: Analysis, target: float, cfg: ImportanceConfig) -> bool:
    """The target is within reach: every group at its fewest units costs at most ``target`` MACs."""
    return a.cost.macs({g: lo for g, (lo, _) in unit_bounds(a, False, cfg.solve).items()}) <= target


def kept_units(a: Analysis, plan: Plan) -> dict[int, np.ndarray]:
    """Per group of ``a``, the units ``plan`` keeps (read from the edit of one of its sites)."""
    edits = {id(e.site): e for e in plan.edits}
    out = {}
    for g in a.groups:
        keep = np.ones(g.units, dtype=bool)
        m = next((m for m in g.members if id(m.site) in edits), None)
        if m is not None:
            e = edits[id(m.site)]
            units = m.index[e.index[~e.new.astype(bool)]]
            keep = np.zeros(g.units, dtype=bool)
            keep[units[units >= 0]] = True
        out[g.id] = keep
    return out


def holdout(data: Any, n: int) -> tuple[Any, Any]:
    """``(train part, validation part)``: the last ``n`` samples of tensor or dict-of-tensor data held out
    (when at least ``4 n`` remain), else ``(data, None)``."""
    t, mp = as_tensors(data), as_mapping(data)
    size = len(t[0]) if t is not None else len(next(iter(mp.values()))) if mp is not None else 0
    if size < 5 * n:
        return data, None
    if t is not None:
        return tuple(x[:-n] for x in t), tuple(x[-n:] for x in t)
    assert mp is not None
    return {k: v[:-n] for k, v in mp.items()}, {k: v[-n:] for k, v in mp.items()}


@torch.no_grad()
def val_loss(sn, masks: Masks, teacher, batches: list, cfg: ImportanceConfig, device: str) -> float:
    """``L_val`` (module docstring) of the masked supernet ``sn`` on ``batches``."""
    sn.gm.to(device).eval()
    total, n = 0.0, 0
    with Hooks(sn, masks):
        for b in batches:
            b = as_batch(b).to(device)
            total += divergence(prediction(b.call(sn.gm)).float(), prediction(b.call(teacher)).float(),
                                cfg.loss)
            n += b.size
    return total / max(n, 1)


def screen(a0: Analysis, target: float, data: Any, val_data: Any = None,
           cfg: ImportanceConfig = ImportanceConfig(), ctx: dist.DistContext | None = None,
           align: Callable | None = None):
    """The importance strategy with axis screening (module docstring); ``cfg.screen`` False (or fewer than
    two candidates): ``importance`` as it is. ``cfg.screen`` an int ``n``: the first ``n`` candidates.
    Returns ``(graph without gates, plan, supernet, history)`` as ``importance`` does."""
    axes = axes_of(a0)
    sets = [(n, h, cfg.floor) for n, h in candidates(axes) if reachable(held(a0, axes, h), target, cfg)]
    sets[1:1] = [(f"floor {f:g}", (), f) for f in cfg.floors if f != cfg.floor and sets]
    sets = sets[:len(sets) if cfg.screen is True else int(cfg.screen)]
    if len(sets) < 2:
        return importance(a0, target, data, val_data, cfg, ctx, align)
    t0 = time.perf_counter()
    ctx = ctx if ctx is not None else dist.setup()
    n_val = cfg.calib_batches * cfg.batch_size
    train_data, val = (data, val_data) if val_data is not None else holdout(data, n_val)
    source = val if val is not None else data
    vb = batches_of(a0, source, cfg.batch_size, cfg.seed + 104729, ctx)
    val_batches = [dataclasses.replace(vb.get(k), reference=None) for k in range(cfg.calib_batches)]
    teacher = teacher_of(a0, ctx)
    each = cfg.steps // (2 * len(sets))
    best, rows, history = None, [], []
    for name, hold, floor in sets:
        sub = dataclasses.replace(cfg, steps=each, screen=False, floor=floor)
        plain, plan, sn, hist = importance(held(a0, axes, hold), target, train_data, None, sub, ctx, align)
        masks = _masks(sn, plan, cfg)
        loss = val_loss(sn, masks, teacher, val_batches, cfg, ctx.device)
        widths = hist[-1]["widths"]
        rows.append({"candidate": name, "held": list(hold), "val_kl": loss,
                     "macs_ratio": sn.analysis.cost.macs(plan.units) / a0.macs(),
                     "axis_units": _per_axis(sn.analysis, axes, widths, a0)})
        history += [{**h, "candidate": name} for h in hist if "step" in h]
        if best is None or loss < best[0]:
            best = (loss, name, plain, plan, sn, hist, masks)
        sn.gm.to("cpu")
    assert best is not None
    loss, name, plain, plan, sn, hist, masks = best
    rest = cfg.steps - each * len(sets)
    if rest > 0:
        sn.gm.to(ctx.device)
        batches = batches_of(a0, train_data, cfg.batch_size, cfg.seed + 1, ctx, teacher)
        opt = torch.optim.SGD(sn.weight_parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
        history += train(sn, masks, teacher, batches, each * len(sets), rest, opt, cfg, ctx)
        sn.gm.to("cpu")
        plain = strip_gates(sn.gm).graph_module
    note = "axis screen (val KL after " + f"{each} steps): " + ", ".join(
        f"{r['candidate']} {r['val_kl']:.4f}" for r in rows) + f"; kept {name}"
    last = {**hist[-1], "seconds": time.perf_counter() - t0, "screen": rows, "chosen": name, "note": note,
            "searched": f"{hist[-1]['searched']}, screened: {name}"}
    return plain, plan, sn, [*history, last]


def _masks(sn, plan: Plan, cfg: ImportanceConfig) -> Masks:
    keep = kept_units(sn.analysis, plan)
    blocks = {b: b not in plan.remove for b in sn.spec.depths} if cfg.depth else {}
    return Masks({g: keep[g] for g in sn.spec.widths}, blocks)


def _per_axis(a: Analysis, axes: dict[int, str], widths: dict, a0: Analysis) -> dict[str, list[int]]:
    """``{axis: [units kept, units]}`` summed over the axis' groups (matched to ``a0``'s by producer)."""
    by_producer = {g.producer: axes.get(g.id) for g in a0.groups}
    out: dict[str, list[int]] = {}
    for g in a.prunable:
        axis = by_producer.get(g.producer)
        if axis is not None:
            k = out.setdefault(axis, [0, 0])
            k[0] += int(widths.get(g.id, g.units))
            k[1] += g.units
    return out
