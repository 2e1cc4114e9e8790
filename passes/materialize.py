"""Pass: materialize a plan — slice or widen every site, then remove or repeat residual blocks.

For a site edit with source positions ``idx`` and grown-copy mask ``new`` (see ``fxadapt.plan``):

- parameters: ``W' = W.index_select(axis, idx)``; at grown positions an *input* (consumer) weight is set to
  zero, so ``y = sum_c W'[:, c] x'_c = sum_{c old} W[:, c] x_c``: the grown network computes the same
  function before any training. Producer weights of copies get a small relative noise
  (``cfg.noise * std``) to break symmetry; that cannot reach the output because every consumer weight
  of the copy is zero. Norm parameters and statistics are copied exactly.
- depthwise ``groups`` follows the new channel count; int entries of view/reshape/expand shape lists
  become the new axis size; split sizes are recounted (``chunk`` turns into ``split_with_sizes``); slice
  bounds become the new start/end of the kept run.
- modules are refreshed from their parameters (``in_channels``, ``num_features``, ``in_features``...).

Depth (``passes.rewire_blocks``) is applied after widths, so repeated blocks copy the new widths.
The caller's graph module is deep-copied, never mutated.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from fxadapt.passes.lift_modules import getattr_path, set_path
from fxadapt.passes.rewire_blocks import rewire_blocks
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.infra.pass_base import PassResult

from fxadapt.planning.plan import Plan, SiteEdit

aten = torch.ops.aten


@dataclass(frozen=True)
class MaterializeConfig:
    noise: float = 1e-2
    seed: int = 0


def materialize(gm: GraphModule, plan: Plan, cfg: MaterializeConfig = MaterializeConfig()) -> PassResult:
    """Apply ``plan`` to a copy of ``gm`` (widths first, then blocks)."""
    out = copy.deepcopy(gm)
    gen = torch.Generator().manual_seed(cfg.seed)
    nodes = {n.name: n for n in out.graph.nodes}
    done: set = set()
    touched: set[str] = set()
    for edit in plan.edits:
        s = edit.site
        if s.kind == "param" and (s.ref.target, s.axis) not in done:
            done.add((s.ref.target, s.axis))
            _edit_param(out, edit, cfg, gen)
            touched.add(s.ref.module_path)
        elif s.kind == "groups":
            touched.add(nodes[s.node_name].target)
            getattr_path(out, nodes[s.node_name].target).groups = len(edit.index)
        elif s.kind in ("shape_arg", "split", "slice"):
            _edit_node(nodes[s.node_name], edit)
    for path in touched:
        refresh_module(getattr_path(out, path) if path else out)
    rewire_blocks(out, plan)
    out.graph.eliminate_dead_code(is_impure_node=_impure)
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    return PassResult(out, bool(plan.edits or plan.remove or plan.repeat))


def _impure(node) -> bool:
    """In-place activations on dead intermediates (``relu_``) are dead too; keep I/O and assertions."""
    return node.op in ("placeholder", "output") or (node.op == "call_function" and "assert" in str(node.target))


def _edit_param(gm: GraphModule, edit: SiteEdit, cfg: MaterializeConfig, gen: torch.Generator) -> None:
    s = edit.site
    old = getattr_path(gm, s.ref.target)
    idx = torch.as_tensor(edit.index)
    new = old.detach().index_select(s.axis, idx).clone()
    if edit.new.any():
        grown = torch.as_tensor(np.flatnonzero(edit.new))
        view = new.transpose(0, s.axis)
        if s.role == "in":
            view[grown] = 0
        elif s.role == "out" and cfg.noise and new.is_floating_point():
            src = view[grown]
            view[grown] = src + cfg.noise * src.std().clamp_min(1e-8) * torch.randn(src.shape, generator=gen)
    value = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    set_path(gm, s.ref.target, value)


def _edit_node(node, edit: SiteEdit) -> None:
    s = edit.site
    if node.op != "call_function":
        return  # lifted modules get their shapes from refresh_module
    args = list(node.args)
    if s.kind == "shape_arg":
        shape = list(args[s.arg])
        shape[s.index] = int(len(edit.index))
        args[s.arg] = shape
    elif s.kind == "split":
        dim = s.arg
        sizes = [v.shape[dim] for v in node.meta["val"]]
        bounds = np.cumsum([0] + list(sizes))
        counts = [int(((edit.index >= lo) & (edit.index < hi)).sum()) for lo, hi in zip(bounds[:-1], bounds[1:])]
        node.target = aten.split_with_sizes.default
        args = [args[0], counts, dim]
        node.kwargs = {}
    elif s.kind == "slice":
        lo, hi = s.arg, s.index
        inside = np.flatnonzero((edit.index >= lo) & (edit.index < hi))
        if inside.size and np.any(np.diff(inside) != 1):
            raise ValueError(f"{node.name}: the sliced channels are not contiguous after the edit")
        start, end = (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)
        if node.target is aten.narrow.default:
            args[2], args[3] = start, end - start
        else:
            args = [args[0], args[1] if len(args) > 1 else 0, start, end] + args[4:]
    node.args = tuple(args)


def refresh_module(m: nn.Module) -> None:
    """Recompute a module's size attributes from its (re-sliced) parameters."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.modules.conv._ConvNd) and w is not None:
        if m.transposed:
            m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        ref = w if w is not None else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]
    elif isinstance(m, nn.LayerNorm):
        ref = w if w is not None else getattr(m, "bias", None)
        if ref is not None:
            m.normalized_shape = tuple(ref.shape)
    elif isinstance(m, nn.GroupNorm) and w is not None:
        m.num_channels = w.shape[0]
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = w.shape
