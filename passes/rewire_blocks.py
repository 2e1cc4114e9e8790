"""Pass: remove residual blocks (``y = x + f(x) -> y = x``) and insert zero-initialised copies.

Removal is exact by construction: the exit ``add`` is replaced by its entry and the body is dead code.

Repetition inserts ``y2 = y + f'(y)`` after the block's exit, where ``f'`` is a copy of the body (new
modules named ``<path>__rep<k>``, holding copies of the — already re-widthed — weights). To keep the
function, ``f'(y) == 0`` at insertion: walking back from the body output through ops that map zero to
zero (relu, dropout, pooling, reshapes, a product with anything...), the first parametric op (BatchNorm,
conv, linear) gets weight and bias zeroed. If the walk meets any other op the block is not repeatable and
the reason is given (``repeat_blocker``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from fxadapt.passes.lift_modules import getattr_path
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassResult

from fxadapt import meta
from fxadapt.ir.atencall import AtenCall
from fxadapt.ir.channels import ParamRef
from fxadapt.ir.plan_types import Plan
from fxadapt.ops.registry import spec_of

aten = torch.ops.aten


def body_output(nodes: dict, block) -> Node:
    exit_ = nodes[block.exit]
    return next(a for a in exit_.args[:2] if isinstance(a, Node) and a.name != block.entry)


def zeroed_params(gm: GraphModule, node: Node) -> list[nn.Parameter]:
    """The parameters a lifted node reads (zeroing them all makes a ``zero == "params"`` op output zero)."""
    refs = node.meta[meta.ATEN].params() if node.op == "call_module" and meta.ATEN in node.meta else ()
    return [t for t in (getattr_path(gm, r.target) for r in refs) if isinstance(t, nn.Parameter)]


def zero_source(gm: GraphModule, node: Node, body: set[str]) -> Node | str:
    """The parametric node whose zeroing makes the body output ``node`` zero, or why there is none: walk
    back through ops whose registry entry says ``zero == "preserves"`` to one that says ``"params"``."""
    while True:
        spec = spec_of(node)
        zero = spec.zero if spec is not None else None
        if zero == "params" and zeroed_params(gm, node):
            return node
        if zero == "preserves":
            ins = [a for a in node.all_input_nodes if a.name in body]
            if not ins:
                return f"{node.name} has no input inside the block"
            node = ins[0]
            continue
        what = node.meta[meta.ATEN].op if node.op == "call_module" and meta.ATEN in node.meta else node.target
        return f"{node.name} ({what}) does not map zero to zero"


def repeat_blocker(gm: GraphModule, block) -> str | None:
    if not block.repeatable:
        return block.reason or "not repeatable"
    nodes = {n.name: n for n in gm.graph.nodes}
    found = zero_source(gm, body_output(nodes, block), set(block.body))
    return found if isinstance(found, str) else None


@dataclass(frozen=True)
class RewireConfig:
    copy: bool = True   # work on a deep copy (the default) or in place (the caller's own copy)


def rewire_blocks(gm: GraphModule, plan: Plan, cfg: RewireConfig = RewireConfig()) -> PassResult:
    """Apply ``plan.remove`` and ``plan.repeat`` (block ids of ``plan.blocks``).

    >>> import torch, fxadapt
    >>> from fxadapt.planning.plan import make_plan
    >>> class Res(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.c = torch.nn.Conv2d(4, 4, 3, padding=1)
    ...     def forward(self, x):
    ...         return x + self.c(x)
    >>> a = fxadapt.analyze(Res(), (torch.randn(1, 4, 6, 6),))
    >>> res = rewire_blocks(a.gm, make_plan(a, {}, repeat={0: 1}))
    >>> res.modified, sorted(n for n, _ in res.graph_module.named_children())
    (True, ['c', 'c__rep0_0'])
    """
    if not (plan.repeat or plan.remove):
        return PassResult(gm, False)
    gm = copy.deepcopy(gm) if cfg.copy else gm
    blocks = {b.id: b for b in plan.blocks}
    nodes = {n.name: n for n in gm.graph.nodes}
    for bid, count in sorted(plan.repeat.items()):
        for k in range(count):
            _insert_copy(gm, nodes, blocks[bid], k)
    _remove(nodes, [blocks[b] for b in plan.remove])
    modified = bool(plan.repeat or plan.remove)
    if modified:
        gm.graph.eliminate_dead_code(is_impure_node=_impure)
        gm.delete_all_unused_submodules()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


def _remove(nodes: dict, removed: list) -> None:
    """``exit -> entry`` for every removed block, in graph order, through the removals before it: when a
    block's entry is the exit of a block removed earlier (a repeated copy right after a removed block), it
    is routed to that block's own entry, so the earlier removal is not undone."""
    order = {name: i for i, name in enumerate(nodes)}
    alias: dict[str, Node] = {}
    for b in sorted(removed, key=lambda b: order[b.exit]):
        entry = nodes[b.entry]
        while entry.name in alias:
            entry = alias[entry.name]
        nodes[b.exit].replace_all_uses_with(entry)
        alias[b.exit] = entry


def _impure(node: Node) -> bool:
    """In-place activations on dead intermediates (``relu_``) are dead too; keep I/O and assertions."""
    return node.op in ("placeholder", "output") \
            or (node.op == "call_function" and "assert" in str(node.target))


def _insert_copy(gm: GraphModule, nodes: dict, block, k: int) -> None:
    graph = gm.graph
    exit_ = nodes[block.exit]
    cur = _last_copy_exit(exit_)
    env: dict[Node, Node] = {nodes[block.entry]: cur}
    anchor, created = cur, []
    for name in block.body:
        old = nodes[name]
        with graph.inserting_after(anchor):
            new = graph.node_copy(old, lambda n: env.get(n, n))
        if old.op == "call_module":
            target = f"{old.target}__rep{block.id}_{k}"
            gm.add_submodule(target, copy.deepcopy(gm.get_submodule(old.target)))
            new.target = target
        new.meta = {key: v for key, v in old.meta.items() if key != meta.BLOCK}
        if old.op == "call_module" and meta.ATEN in old.meta:
            new.meta[meta.ATEN] = _retarget(old.meta[meta.ATEN], str(old.target), str(new.target))
        env[old] = new
        anchor = new
        created.append(new)
    with graph.inserting_after(anchor):
        add = graph.call_function(aten.add.Tensor, (cur, env[body_output(nodes, block)]))
    add.meta["val"] = exit_.meta.get("val")
    add.meta[meta.REPEAT_OF] = block.exit
    created_set = set(created) | {add}
    cur.replace_all_uses_with(add, delete_user_cb=lambda u: u not in created_set)
    src = zero_source(gm, env[body_output(nodes, block)], {n.name for n in created})
    if isinstance(src, str):
        raise ValueError(f"block {block.id} ({block.exit}) cannot be repeated: {src}")
    with torch.no_grad():
        for p in zeroed_params(gm, src):
            p.zero_()


def _retarget(call: AtenCall, old: str, new: str) -> AtenCall:
    """The copied module's ATen template must name the copy's parameters, not the original's."""
    args = tuple(ParamRef(new + a.target[len(old):]) if isinstance(a, ParamRef)
                 and a.target.startswith(old + ".")
                 else a for a in call.args)
    return AtenCall(call.op, args)


def _last_copy_exit(exit_: Node) -> Node:
    """The newest node standing for the block's output (after earlier copies were chained on)."""
    cur = exit_
    while True:
        nxt = [u for u in cur.users if u.meta.get(meta.REPEAT_OF) == exit_.name]
        if not nxt:
            return cur
        cur = nxt[0]
