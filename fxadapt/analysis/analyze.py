"""``fxadapt.analyze``: coupled channel groups, residual blocks and the cost model of a model.

Pipeline: capture (unless given a captured ``GraphModule``) -> propagate channel labels through the op-rule
table -> form groups from label unions and sites -> find residual blocks by dominance -> build the cost
polynomial. Results are frozen dataclasses; per-node conclusions are written to ``node.meta`` under the
keys in ``fxadapt.meta``; the networkx data-flow graph stays inside the ``Analysis``.

Example:
    >>> import torch, fxadapt
    >>> class Res(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem, self.body = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, padding=1)
    ...         self.head = torch.nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         x = self.stem(x)
    ...         return self.head((x + self.body(x)).mean((2, 3)))
    >>> a = fxadapt.analyze(Res(), (torch.randn(1, 3, 12, 12),))
    >>> [(g.name, g.width, g.prunable) for g in a.groups]
    [('stem', 8, True), ('head', 2, False)]
    >>> [(b.entry, b.exit, b.removable) for b in a.blocks]
    [('stem', 'add', True)]
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
from torch.fx import GraphModule

from fxadapt import meta
from fxadapt.analysis.blocks import Block, dataflow_graph, find_blocks
from fxadapt.analysis.cost import CostModel
from fxadapt.analysis.cost_build import build_cost
from fxadapt.analysis.crosscheck import Uncosted, crosscheck
from fxadapt.analysis.groups import Group, form_groups
from fxadapt.analysis.propagate import labels_of, propagate
from fxadapt.analysis.summary import analysis_table
from fxadapt.errors import (
    UncostedWarning,  # noqa: F401  (defined in fxadapt.errors)
    warn,
)
from fxadapt.passes.capture import capture


@dataclass
class Analysis:
    """What fxadapt knows about a captured model (see module docstring)."""

    gm: GraphModule
    groups: list[Group]
    blocks: list[Block]
    cost: CostModel
    graph: nx.DiGraph = field(repr=False)
    fired: Counter = field(default_factory=Counter)
    group_of: np.ndarray = field(default=None, repr=False)  # type: ignore[arg-type]  # set by analyze()
    unit_of: np.ndarray = field(default=None, repr=False)   # type: ignore[arg-type]
    roots: np.ndarray = field(default=None, repr=False)     # type: ignore[arg-type]
    uncosted: tuple[Uncosted, ...] = ()
    with_experts: bool = False
    # what ``cost.macs`` counts, as messages name it ("parameters" in ``params_as_macs``)
    counting: str = "MACs"
    hold: Any = None            # the user's ``fxadapt.analysis.hold.Hold`` applied to the groups (None: none)

    @property
    def prunable(self) -> list[Group]:
        """The groups the solvers and searches move: channel groups, and expert groups in ``params_as_macs``
        (under top-k routing removing experts saves parameters, not MACs per token)."""
        return [g for g in self.groups if g.prunable and (self.with_experts or g.top_k is None)]

    @property
    def experts(self) -> list[Group]:
        """Prunable expert groups (whole experts of a mixture-of-experts layer; ``fxadapt.ops.routing``)."""
        return [g for g in self.groups if g.prunable and g.top_k is not None]

    def params_as_macs(self) -> Analysis:
        """A copy whose ``macs()`` (and ``cost.macs``) count *parameters*, not MACs: the view a params budget
        is solved on, since the width solvers read ``macs``; its expert groups are prunable (at least
        ``top_k`` experts stay) and its ``counting`` is "parameters", so messages name what they count."""
        cost = CostModel(self.cost.params_terms, self.cost.params_terms, self.cost.units)
        return dataclasses.replace(self, cost=cost, with_experts=True, counting="parameters")

    def units_for(self, widths: dict[int, int] | None) -> dict[int, float] | None:
        if widths is None:
            return None
        return {gid: w / self.groups[gid].granularity for gid, w in widths.items()}

    def _units(self, channels: dict | None, units: dict | None) -> dict | None:
        if channels is not None and units is not None:
            raise ValueError("give channels= (widths in channels) or units= (solver output: kept units), not "
                             "both")
        return units if units is not None else self.units_for(channels)

    def macs(self, *, channels: dict[int, int] | None = None, units: dict[int, int] | None = None,
             present: dict[int, float] | None = None) -> float:
        """Total MACs at the given group widths — ``channels=`` in channels, or ``units=`` in kept units as
        the solver and plans count them (a unit is ``granularity`` channels; default: current) — and block
        presences. Keyword-only, so the two cannot be confused."""
        return self.cost.macs(self._units(channels, units), present)

    def params(self, *, channels: dict[int, int] | None = None, units: dict[int, int] | None = None,
               present: dict[int, float] | None = None) -> float:
        """Total parameters, with the widths given as in ``macs``."""
        return self.cost.params(self._units(channels, units), present)

    def summary(self) -> str:
        return analysis_table(self)


def analyze(model: Any, example_inputs: Any = None, attention: str | None = None) -> Analysis:
    """Analyse ``model`` (an ``nn.Module`` plus example inputs, or a ``GraphModule`` from ``capture``).

    ``attention``: how attention is adapted: ``"heads"`` (whole heads), ``"head_dim"`` (head count kept,
    ``head_dim`` pruned) or ``"auto"`` (heads where the model applies rotary embeddings, else head_dim); see
    ``fxadapt.ops.reshape``. Default: the mode the graph was analysed with before (rewritten graphs keep
    it), else ``"auto"``."""
    if isinstance(model, GraphModule) and meta.BATCH in model.meta:
        gm = model
    else:
        gm = capture(model, example_inputs)
    attention = attention or gm.meta.get(meta.ATTENTION, "auto")
    gm.meta[meta.ATTENTION] = attention
    ctx = propagate(gm, attention)
    groups, group_of, unit_of = form_groups(ctx.ledger)
    roots = ctx.ledger.uf.roots()
    graph = dataflow_graph(gm)
    blocks = find_blocks(gm, graph)
    node_blocks: dict[str, tuple[int, ...]] = {}
    for b in blocks:
        if b.removable:
            for name in b.body:
                node_blocks[name] = node_blocks.get(name, ()) + (b.id,)
    cost = build_cost(gm, ctx, groups, roots, group_of, node_blocks)
    macs_sh, params_sh = cost.shares("macs"), cost.shares("params")
    groups = [dataclasses.replace(g, macs_share=macs_sh.get(g.id, 0.0), params_share=params_sh.get(g.id, 0.0))
              if g.prunable else g for g in groups]
    _annotate(gm, roots, group_of, node_blocks)
    uncosted = crosscheck(gm, ctx.shapes, cost)
    if uncosted:
        warn(f"fxadapt.analyze: the cost model misses {len(uncosted)} op(s) torch counts: "
                      + "; ".join(str(u) for u in uncosted[:5]), UncostedWarning)
    return Analysis(gm, groups, blocks, cost, graph, ctx.fired, group_of, unit_of, roots, uncosted)


def _annotate(gm: GraphModule, roots, group_of, node_blocks) -> None:
    for node in gm.graph.nodes:
        labs = labels_of(node.meta.get(meta.TRACK))
        if labs:
            ids = np.unique(group_of[roots[np.concatenate([lab.reshape(-1) for lab in labs])]])
            node.meta[meta.GROUP] = tuple(int(i) for i in ids if i >= 0)
        if node.name in node_blocks:
            node.meta[meta.BLOCK] = node_blocks[node.name]
