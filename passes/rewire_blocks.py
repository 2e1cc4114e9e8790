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

import torch
from fxadapt.passes.lift_modules import AtenCall
from torch import nn
from torch.fx import GraphModule, Node

from fxadapt import meta
from fxadapt.ir.channels import ParamRef

aten = torch.ops.aten
ZERO_TO_ZERO = {
    aten.relu.default, aten.relu_.default, aten.relu6.default, aten.relu6_.default, aten.hardtanh.default,
    aten.hardtanh_.default, aten.silu.default, aten.silu_.default, aten.gelu.default, aten.hardswish.default,
    aten.hardswish_.default, aten.leaky_relu.default, aten.leaky_relu_.default, aten.tanh.default,
    aten.mish.default, aten.elu.default, aten.max_pool2d.default, aten.avg_pool2d.default,
    aten.adaptive_avg_pool2d.default, aten.view.default, aten.reshape.default, aten.permute.default,
    aten.transpose.int, aten.contiguous.default, aten.clone.default, aten.dropout.default,
    aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.div.Scalar, aten.flatten.using_ints,
    aten.upsample_nearest2d.vec, aten.alias.default, aten.feature_dropout.default,
}
ZEROABLE = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear, nn.LayerNorm, nn.GroupNorm)


def _body_output(nodes: dict, block) -> Node:
    exit_ = nodes[block.exit]
    return next(a for a in exit_.args[:2] if isinstance(a, Node) and a.name != block.entry)


def _zero_source(gm: GraphModule, node: Node, body: set[str]) -> Node | str:
    """The parametric node whose zeroing makes the body output ``node`` zero, or why there is none."""
    while True:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, ZEROABLE) and getattr(mod, "weight", None) is not None:
                return node
            if isinstance(mod, nn.modules.dropout._DropoutNd):
                node = node.args[0]
                continue
            return f"{node.name} ({type(mod).__name__}) does not map zero to zero"
        if node.op == "call_function" and node.target in ZERO_TO_ZERO:
            ins = [a for a in node.args if isinstance(a, Node) and a.name in body]
            if not ins:
                return f"{node.name} has no input inside the block"
            node = ins[0]
            continue
        return f"{node.name} ({node.target}) does not map zero to zero"


def repeat_blocker(gm: GraphModule, block) -> str | None:
    if not block.repeatable:
        return block.reason or "not repeatable"
    nodes = {n.name: n for n in gm.graph.nodes}
    found = _zero_source(gm, _body_output(nodes, block), set(block.body))
    return found if isinstance(found, str) else None


def rewire_blocks(gm: GraphModule, plan) -> None:
    """Apply ``plan.remove`` and ``plan.repeat`` to ``gm`` in place (``gm`` is the materializer's copy)."""
    blocks = {b.id: b for b in plan.blocks}
    nodes = {n.name: n for n in gm.graph.nodes}
    for bid, count in sorted(plan.repeat.items()):
        for k in range(count):
            _insert_copy(gm, nodes, blocks[bid], k)
    for bid in sorted(plan.remove):
        b = blocks[bid]
        nodes[b.exit].replace_all_uses_with(nodes[b.entry])


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
            new.meta[meta.ATEN] = _retarget(old.meta[meta.ATEN], old.target, new.target)
        env[old] = new
        anchor = new
        created.append(new)
    with graph.inserting_after(anchor):
        add = graph.call_function(aten.add.Tensor, (cur, env[_body_output(nodes, block)]))
    add.meta["val"] = exit_.meta.get("val")
    add.meta["fxadapt.repeat_of"] = block.exit
    created_set = set(created) | {add}
    cur.replace_all_uses_with(add, delete_user_cb=lambda u: u not in created_set)
    src = _zero_source(gm, env[_body_output(nodes, block)], {n.name for n in created})
    if isinstance(src, str):
        raise ValueError(f"block {block.id} ({block.exit}) cannot be repeated: {src}")
    mod = gm.get_submodule(src.target)
    with torch.no_grad():
        mod.weight.zero_()
        if getattr(mod, "bias", None) is not None:
            mod.bias.zero_()


def _retarget(call: AtenCall, old: str, new: str) -> AtenCall:
    """The copied module's ATen template must name the copy's parameters, not the original's."""
    args = tuple(ParamRef(new + a.target[len(old):]) if isinstance(a, ParamRef) and a.target.startswith(old + ".")
                 else a for a in call.args)
    return AtenCall(call.op, args)


def _last_copy_exit(exit_: Node) -> Node:
    """The newest node standing for the block's output (after earlier copies were chained on)."""
    cur = exit_
    while True:
        nxt = [u for u in cur.users if u.meta.get("fxadapt.repeat_of") == exit_.name]
        if not nxt:
            return cur
        cur = nxt[0]
