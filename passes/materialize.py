"""Pass: materialize a plan's widths — slice or widen every site (blocks: ``passes.rewire_blocks``;
``apply_plan`` runs both).

For a site edit with source positions ``idx`` and grown-copy mask ``new`` (see ``fxadapt.planning.plan``):

- parameters: ``W' = W.index_select(axis, idx)``; at grown positions an *input* (consumer) weight is set to
  zero, so ``y = sum_c W'[:, c] x'_c = sum_{c old} W[:, c] x_c``: the grown network computes the same
  function before any training. Producer weights of copies get a small relative noise
  (``cfg.noise * std``) to break symmetry; that cannot reach the output because every consumer weight
  of the copy is zero. Norm parameters and statistics are copied exactly.
- a node's own arguments (a depthwise conv's ``groups``, view/expand/unflatten shape lists, split sizes,
  slice bounds) are rewritten by its registry entry's ``edit`` (``fxadapt.ops.edits``);
- every lifted module whose tensors or template changed is rebuilt by its entry's ``lift`` builder, so
  its attributes (``in_channels``, ``num_features``...) agree with its tensors.

Depth (``passes.rewire_blocks``) is applied after widths, so repeated blocks copy the new widths.
The caller's graph module is copied (copy-on-write, ``fxadapt.ir.share``), never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from fxadapt.passes.lift_modules import fill_args, getattr_path, relift, set_path
from fxadapt.passes.rewire_blocks import RewireConfig, rewire_blocks
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxadapt import meta
from fxadapt.ir.atencall import AtenCall
from fxadapt.ir.plan_types import Plan, SiteEdit
from fxadapt.ir.share import shared_copy
from fxadapt.ops.registry import op_of, spec_of

NODE_SITES = ("shape_arg", "groups", "split", "slice")


@dataclass(frozen=True)
class MaterializeConfig:
    noise: float = 1e-2
    seed: int = 0


def materialize(gm: GraphModule, plan: Plan, cfg: MaterializeConfig = MaterializeConfig()) -> PassResult:
    """Apply ``plan`` to a copy of ``gm`` (widths first, then blocks).

    >>> import torch, fxadapt
    >>> from fxadapt.planning.plan import make_plan
    >>> a = fxadapt.analyze(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1)),
    ...                     (torch.randn(1, 3, 8, 8),))
    >>> small = materialize(a.gm, make_plan(a, {a.prunable[0].id: 5})).graph_module
    >>> small.get_submodule("0").out_channels, small.get_submodule("1").in_channels
    (5, 5)
    """
    out = _copy_but(gm, {e.site.param for e in plan.edits if e.site.kind == "param"})
    gen = torch.Generator().manual_seed(cfg.seed)
    nodes = {n.name: n for n in out.graph.nodes}
    slices = _slices(plan)
    done: set = set()
    changed: set[str] = set()
    for edit in plan.edits:
        s = edit.site
        if s.kind == "param" and (s.param, s.axis) not in done:
            for e in slices.get(s.param, [edit]):   # a param that only shrinks: all its axes now, rows first
                done.add((e.site.param, e.site.axis))
                _edit_param(out, e, cfg, gen)
            changed.add(s.param)
        elif s.kind in NODE_SITES:
            _edit_node(nodes[s.node_name], edit)
            changed.add(s.node_name)
    for node in out.graph.nodes:
        tpl = node.meta.get(meta.ATEN) if node.op == "call_module" else None
        if tpl is not None and (node.name in changed or any(p.target in changed for p in tpl.params())):
            relift(out, node)
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    return PassResult(out, bool(plan.edits))


def apply_plan(gm: GraphModule, plan: Plan, cfg: MaterializeConfig = MaterializeConfig()) -> PassResult:
    """``materialize`` (widths), then ``rewire_blocks`` (remove/repeat blocks) on its copy."""
    wide = materialize(gm, plan, cfg)
    deep = rewire_blocks(wide.graph_module, plan, RewireConfig(copy=False))
    return PassResult(deep.graph_module, wide.modified or deep.modified)


def _slices(plan: Plan) -> dict[str, list[SiteEdit]]:
    """Per parameter that only shrinks (no grown position on any axis), its first edit of each axis, axis 0
    first: selecting rows first (a contiguous copy) leaves the slower strided selection of the other axes
    fewer rows. Selections along different axes commute, so the values are those of the plan's order;
    a growing parameter keeps the plan's order (its noise is drawn in that order)."""
    per: dict[str, dict[int, SiteEdit]] = {}
    grows: set[str] = set()
    for e in plan.edits:
        if e.site.kind == "param":
            per.setdefault(e.site.param, {}).setdefault(e.site.axis, e)
            if e.new.any():
                grows.add(e.site.param)
    return {p: sorted(axes.values(), key=lambda e: e.site.axis != 0)
            for p, axes in per.items() if p not in grows}


def _copy_but(gm: GraphModule, replaced: set[str]) -> GraphModule:
    """A copy of ``gm`` (new modules, its other tensors copy-on-write clones: ``fxadapt.ir.share``) that keeps
    the tensors about to be replaced as they are (they are only read: the copy gets new tensors in their
    place, so the caller's graph module is never touched)."""
    keep = {}
    for name in replaced:
        t = getattr_path(gm, name)
        keep[id(t)] = t
    return shared_copy(gm, keep)


def _edit_param(gm: GraphModule, edit: SiteEdit, cfg: MaterializeConfig, gen: torch.Generator) -> None:
    s = edit.site
    old = getattr_path(gm, s.param)
    idx = torch.as_tensor(edit.index, device=old.device)
    new = old.detach().index_select(s.axis, idx)  # a new tensor: the original is only read
    if edit.new.any():
        grown = torch.as_tensor(np.flatnonzero(edit.new), device=old.device)
        view = new.transpose(0, s.axis)
        if s.role == "in":
            view[grown] = 0
        elif s.role == "out" and cfg.noise and new.is_floating_point():
            src = view[grown]
            noise = torch.randn(src.shape, generator=gen).to(src.device, torch.float32)
            # one element: std 0, not NaN
            scale = src.float().std(correction=0).nan_to_num(0.0).clamp_min(1e-8)
            view[grown] = (src.float() + cfg.noise * scale * noise).to(src.dtype)
    value = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    set_path(gm, s.param, value)


def _edit_node(node: Node, edit: SiteEdit) -> None:
    """Rewrite the node's own arguments through its registry entry's ``edit`` (a lifted module's template
    is rewritten instead; the module is rebuilt from it afterwards)."""
    spec, op = spec_of(node), op_of(node)
    if spec is None or spec.edit is None:
        raise ValueError(f"{node.name}: {op} recorded a {edit.site.kind} site but its registry entry has no "
                         "edit")
    if node.op == "call_module":
        tpl = node.meta[meta.ATEN]
        new_op, args = spec.edit(tpl.op, list(tpl.args), edit.site, edit.index, node.meta.get("val"))
        node.meta[meta.ATEN] = AtenCall(new_op, tuple(args))
        return
    new_op, args = spec.edit(op, fill_args(node), edit.site, edit.index, node.meta.get("val"))
    node.target, node.args, node.kwargs = new_op, tuple(args), {}
