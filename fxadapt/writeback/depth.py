"""Depth write-back: removed and repeated residual blocks as operations on the user's module tree.

A block of the plan (``exit = entry + f(entry)``, found on the graph) belongs to a *unit*: the innermost
module of its exit node's module stack that is an element of a ``ModuleList`` or ``nn.Sequential`` (an HF
decoder layer, a ResNet unit). Per unit:

- every weighted layer of the unit lies in a removed block's body -> ``delete`` the unit (an HF layer whose
  attention and MLP halves are both gone leaves its ``ModuleList``);
- a removed block otherwise: the module computing its branch output ``f`` (the deepest module below the
  unit holding only body nodes) becomes a ``ZeroBranch`` (``y = x + 0``); weighted modules of the body
  outside it make the block not expressible (the reason is returned);
- repeated blocks: ``k`` copies of the unit are inserted after it (``k`` = the most any of its blocks is
  repeated); in copy ``j`` each block repeated at least ``j`` times gets its zero-source parameters (the
  ones ``rewire_blocks`` zeroes) zeroed, the others become ``ZeroBranch``. At insertion every copy adds
  zero, as the graph's copies do; a unit that does not map its input shape to its output shape is refused.

Units are edited from the last to the first in their container, so earlier indices stay valid; the
final order of every container (original index per position, ``None``-free) is returned for
``layer_idx``/``layer_types``.

Example:
    >>> import torch
    >>> class Unit(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.body(x)
    >>> import fxadapt
    >>> from fxadapt.planning.plan import make_plan
    >>> m = torch.nn.Sequential(Unit(), Unit())
    >>> a = fxadapt.analyze(m, (torch.randn(2, 4),))
    >>> d = depth_ops(m, a.gm, make_plan(a, {}, remove=[0]),
    ...               fxadapt.ir.inputs.as_inputs((torch.randn(2, 4),)))
    >>> [(o["op"], o["module"]) for o in d.ops], d.order
    ([('delete', '0')], {'': [1]})
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxadapt.ir.capture import as_called
from fxadapt.meta import REPEAT_OF
from fxadapt.ops.registry import spec_of
from fxadapt.passes.rewire_blocks import body_output, zero_source, zeroed_params
from fxadapt.writeback.widths import module_stack as _stack

if TYPE_CHECKING:
    from fxadapt.ir.inputs import Inputs
    from fxadapt.planning.plan import Plan

_REP = re.compile(r"__rep\d+_\d+$")


class NotExpressible(Exception):
    """The change has no form in the user's module tree (the message says why)."""


@dataclass
class DepthPlan:
    ops: list = field(default_factory=list)
    zero: list = field(default_factory=list)     # parameter names to zero after the ops (copies' branches)
    fill: list = field(default_factory=list)     # (copy's module path, graph module path): a trained slot
    order: dict = field(default_factory=dict)    # container path -> original index of every final element
    alive: dict = field(default_factory=dict)    # original block id -> the graph's kept copies of it


def _unit_of(model: nn.Module, node: Node) -> str:
    for path in reversed(_stack(node)):
        parent = path.rpartition(".")[0]
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            continue
        if isinstance(owner, (nn.ModuleList, nn.Sequential)) and path:
            return path
    raise NotExpressible(f"the residual block ending at {node.name} is not inside an element of a ModuleList "
                         f"or nn.Sequential, so it cannot be removed or repeated as a module")


def _weighted(node: Node) -> bool:
    return node.op == "call_module" and getattr(spec_of(node), "zero", None) == "params"


def _effective(plan: Plan, nodes: dict) -> tuple[SimpleNamespace, dict, set]:
    """The plan on the model's own blocks: a graph deepened before planning (``grow_depth``, DNA's depth
    slots) holds copies (their exit records ``REPEAT_OF``); a removed copy is no change to the model, a kept
    one repeats its original (filled from the graph). Returns that plan, the kept copies per original block
    (in graph order) and the copies' nodes."""
    copies = [b for b in plan.blocks if nodes[b.exit].meta.get(REPEAT_OF) is not None]
    own = [b for b in plan.blocks if b not in copies]
    by_exit = {b.exit: b for b in own}
    alive: dict[int, list] = {}
    for c in copies:
        orig = by_exit.get(nodes[c.exit].meta[REPEAT_OF])
        if orig is None:
            raise NotExpressible(f"block {c.exit} copies a block the model does not have")
        if c.id not in plan.remove:
            alive.setdefault(orig.id, []).append(c)
    repeat = {b.id: plan.repeat.get(b.id, 0) + len(alive.get(b.id, ())) for b in own}
    eff = SimpleNamespace(remove=frozenset(b for b in plan.remove if b in {o.id for o in own}),
                          repeat={k: v for k, v in repeat.items() if v}, blocks=tuple(own))
    copy_nodes = {n for c in copies for n in (*c.body, c.exit)}
    return eff, alive, copy_nodes


def depth_ops(model: nn.Module, gm: GraphModule, plan, inputs: Inputs) -> DepthPlan:
    """Depth operations for ``plan.remove``/``plan.repeat`` (block ids of ``plan.blocks`` on ``gm``)."""
    out = DepthPlan()
    if not (plan.remove or plan.repeat or any(REPEAT_OF in n.meta for n in gm.graph.nodes)):
        return out
    all_nodes = {n.name: n for n in gm.graph.nodes}
    plan, alive, copy_nodes = _effective(plan, all_nodes)
    if not (plan.remove or plan.repeat):
        return out
    nodes = {k: v for k, v in all_nodes.items() if k not in copy_nodes}
    out.alive = alive
    blocks = {b.id: b for b in plan.blocks}
    units: dict[str, list] = {}
    for b in plan.blocks:
        try:
            units.setdefault(_unit_of(model, nodes[b.exit]), []).append(b)
        except NotExpressible:
            if b.id in plan.remove or b.id in plan.repeat:
                raise
    changed = {u: bs for u, bs in units.items()
               if any(b.id in plan.remove or b.id in plan.repeat for b in bs)}
    io = _record(model, inputs, changed, nodes, blocks)
    containers: dict[str, list] = {}
    for u in changed:
        containers.setdefault(u.rpartition(".")[0], []).append(u)
    for parent, members in containers.items():
        keys = list((model.get_submodule(parent) if parent else model)._modules)
        order = list(range(len(keys)))
        for u in sorted(members, key=lambda u: keys.index(u.rpartition(".")[2]), reverse=True):
            _unit(_Ctx(model, plan, nodes, io, out), u, units[u], order, keys)
        out.order[parent] = order
    out.zero = [_final(model, where, out.order) + rest for where, rest in out.zero]
    out.fill = [(_final(model, where, out.order) + rest, g) for where, rest, g in out.fill]
    return out


@dataclass(frozen=True)
class _Ctx:
    """What every unit's edit reads: the model, the effective plan, the graph's own nodes, the recorded
    input/output shapes, and the ``DepthPlan`` being written."""

    model: nn.Module
    plan: object
    nodes: dict
    io: dict
    out: DepthPlan


def _unit(ctx: _Ctx, u: str, bs: list, order: list, keys: list) -> None:
    """The operations for unit ``u`` (its blocks ``bs``): delete, zero removed branches, insert copies."""
    model, plan, nodes, io, out = ctx.model, ctx.plan, ctx.nodes, ctx.io, ctx.out
    parent, _, key = u.rpartition(".")
    i = keys.index(key)
    pos = order.index(i)
    removed = [b for b in bs if b.id in plan.remove]
    in_unit = [n for n in nodes.values() if u in _stack(n) and _weighted(n)]
    if removed and all(any(n.name in b.body for b in removed) for n in in_unit):
        out.ops.append({"op": "delete", "module": u})
        order.pop(pos)
        return
    for b in removed:
        out.ops.append(_zero_op(u, u, b, nodes, io))
    k = max([plan.repeat.get(b.id, 0) for b in bs] + [0])
    if k and io.get(u, {}).get("preserves") is False:
        raise NotExpressible(f"{u} does not keep its input shape, so a copy cannot follow it")
    for j in range(k, 0, -1):
        new = _child(parent, pos + 1, f"{key}__rep{j}", model)
        out.ops.append({"op": "insert", "module": new, "after": u})
        order.insert(pos + 1, i)
        for b in bs:   # zero / fill name the copy by its final place (later units shift a ModuleList)
            slots = out.alive.get(b.id, [])
            if plan.repeat.get(b.id, 0) >= j and b.id not in plan.remove and j <= len(slots):
                out.fill += [((parent, i, j, key), rest, g) for rest, g in
                             _fill_pairs(u, b, slots[j - 1], nodes[b.exit].graph.owning_module)]
            elif plan.repeat.get(b.id, 0) >= j and b.id not in plan.remove:
                out.zero += [((parent, i, j, key), n[len(u):]) for n in _zeroed(b, nodes)
                             if n.startswith(u + ".")]
            else:
                out.ops.append(_zero_op(u, new, b, nodes, io))


def _fill_pairs(u: str, b, slot, gm: GraphModule) -> list[tuple[str, str]]:
    """(path inside the unit, module of the graph's kept copy) for every module of the slot: a copy's module
    is named ``<original path>__rep<block>_<k>`` (``rewire_blocks``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    pairs = []
    for c in slot.body:
        nc = nodes.get(c)
        if nc is None or nc.op != "call_module":
            continue
        orig = _REP.sub("", nc.target)
        if orig == nc.target or not orig.startswith(u + "."):
            raise NotExpressible(f"the depth slot module {nc.target} is not a copy of a module of {u}")
        pairs.append((orig[len(u):], nc.target))
    return pairs


def _final(model: nn.Module, where: tuple, order: dict) -> str:
    """The final path of copy ``j`` of unit ``i`` of ``parent``: right after the unit, in order."""
    parent, i, j, key = where
    owner = model.get_submodule(parent) if parent else model
    name = str(order[parent].index(i) + j) if isinstance(owner, nn.ModuleList) else f"{key}__rep{j}"
    return f"{parent}.{name}" if parent else name


def _zeroed(b, nodes: dict) -> list[str]:
    """Names of the parameters ``rewire_blocks`` zeroes in a copy of block ``b``."""
    gm = nodes[b.exit].graph.owning_module
    src = zero_source(gm, body_output(nodes, b), set(b.body))
    if isinstance(src, str):
        raise NotExpressible(f"block {b.exit} cannot be repeated: {src}")
    zeroed = zeroed_params(gm, src)
    return [n for n, p in gm.named_parameters(remove_duplicate=False) if any(p is z for z in zeroed)]


def _child(parent: str, index: int, key: str, model: nn.Module) -> str:
    owner = model.get_submodule(parent) if parent else model
    name = str(index) if isinstance(owner, nn.ModuleList) else key
    return f"{parent}.{name}" if parent else name


def _branch(u: str, b, nodes: dict) -> str:
    """The outermost module below unit ``u`` that computes the block's branch output from body nodes only;
    weighted (matrix) layers of the body outside it make the block not expressible."""
    out_node, body = body_output(nodes, b), set(b.body)
    stack = _stack(out_node)
    below = stack[stack.index(u) + 1:] if u in stack else []
    for path in below:
        if all(n.name in body for n in nodes.values() if path in _stack(n)):
            gm = out_node.graph.owning_module
            stray = [n.name for n in nodes.values() if n.name in body and _weighted(n)
                     and path not in _stack(n)
                     and any(p.dim() >= 2 for p in zeroed_params(gm, n))]
            if stray:
                raise NotExpressible(f"the branch of block {b.exit} spans weighted layers outside {path} "
                                     f"({', '.join(stray[:3])})")
            return path
    raise NotExpressible(f"the branch output of block {b.exit} is computed in {u}'s own forward, not in a "
                         f"submodule that could be replaced")


def _zero_op(u: str, unit_path: str, b, nodes: dict, io: dict) -> dict:
    branch = _branch(u, b, nodes)
    rec = io.get(branch)
    if rec is None or rec.get("like") is None:
        raise NotExpressible(f"{branch}'s output is not shaped like one of its inputs, so it cannot be "
                             "zeroed")
    return {"op": "zero", "module": unit_path + branch[len(u):], "like": rec["like"],
            "structure": rec["structure"]}


def _record(model: nn.Module, inputs: Inputs, units: dict, nodes: dict, blocks: dict) -> dict:
    """Run the model once with hooks on the units and branch modules: which tensor input each output is
    shaped like, and the output structure (for ``ZeroBranch``)."""
    paths = set(units)
    for u, bs in units.items():
        for b in bs:
            try:
                paths.add(_branch(u, b, nodes))
            except NotExpressible:
                pass
    io, handles = {}, []
    for p in paths:
        handles.append(model.get_submodule(p).register_forward_hook(_hook(io, p), with_kwargs=True))
    try:
        with torch.no_grad():
            as_called(model, inputs).call(model.eval())
    finally:
        for h in handles:
            h.remove()
    return io


def _hook(io: dict, path: str):
    def hook(mod, args, kwargs, output):
        ins = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        outs = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, tuple) \
                else []
        first = next((o for o in outs if isinstance(o, torch.Tensor)), None)
        like = next((i for i, t in enumerate(ins) if first is not None and t.shape == first.shape), None)
        ok = all(o is None or (isinstance(o, torch.Tensor) and first is not None and o.shape == first.shape
                               and o is first) for o in outs)
        structure = "tensor" if isinstance(output, torch.Tensor) else [
            "tensor" if o is first else None for o in outs]
        io.setdefault(path, {"like": like if ok else None, "structure": structure,
                             "preserves": bool(ins) and first is not None and ins[0].shape == first.shape})
    return hook

