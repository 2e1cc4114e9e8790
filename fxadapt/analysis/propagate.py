"""Run the op-rule table over a captured graph: channel labels forward, unions and freezes into a ledger.

Each node is normalized to an ATen call (a lifted ``call_module`` through ``node.meta[meta.ATEN]``,
``get_attr`` arguments as ``ParamRef``), looked up in the op registry ``OPS`` and its channel rule run. A node
with no rule, a rule that raises, or a rule whose answer does not fit the node's shape blocks: every channel
flowing into it is frozen with the reason. Channels reaching the graph output are frozen (the output shape is
the model's contract).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule, Node

from fxadapt import meta
from fxadapt.errors import InputError
from fxadapt.ir.channels import ParamRef, Track
from fxadapt.ops import OPS, Blocked, Call, Ctx, RuleRecord, missing_reason
from fxadapt.ops.heads import ATTENTION_MODES
from fxadapt.ops.routing import follow_ids


def concrete_shape(val: Any, batch: int):
    """Shape of a node's ``meta['val']`` at the example batch size (``4*s0`` -> ``4 * batch``)."""
    if isinstance(val, torch.Tensor):
        return tuple(int(d) if isinstance(d, int) else _at_batch(d, batch) for d in val.shape)
    if isinstance(val, (list, tuple)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return tuple(concrete_shape(v, batch) for v in val)
    return None


def _at_batch(d, batch: int) -> int:
    """A symbolic size evaluated with every free symbol set to the batch (only batch axes are dynamic)."""
    return _eval_expr(d.node.expr, batch)


@functools.lru_cache(maxsize=4096)
def _eval_expr(expr, batch: int) -> int:
    return int(expr.subs({sym: batch for sym in expr.free_symbols}))


def _ref(x):
    return ParamRef(x.target) if isinstance(x, Node) and x.op == "get_attr" else x


def normalize(node: Node) -> Call | None:
    if node.op == "call_function":
        args = torch.fx.node.map_aggregate(node.args, _ref)
        kwargs = torch.fx.node.map_aggregate(dict(node.kwargs), _ref)
        return Call(node.target, node, tuple(args), dict(kwargs))
    if node.op == "call_module" and meta.ATEN in node.meta:
        template = node.meta[meta.ATEN]
        return Call(template.op, node, template.bind(node), {})
    return None


class _Params(dict):
    def __init__(self, gm: GraphModule):
        super().__init__()
        self.gm = gm

    def __missing__(self, key: str) -> torch.Tensor:
        obj: Any = self.gm
        for part in key.split("."):
            obj = getattr(obj, part)
        self[key] = obj
        return obj


def _fits(out, shape) -> bool:
    if out is None or isinstance(out, Blocked):
        return True
    if isinstance(out, tuple):
        return isinstance(shape, tuple) and len(out) == len(shape) and all(
            _fits(o, s) for o, s in zip(out, shape) if s is None or isinstance(s, tuple))
    if not isinstance(shape, tuple) or not shape or isinstance(shape[0], tuple):
        return False
    return max(out.axes, default=-1) < len(shape) and out.labels.shape == tuple(shape[a] for a in out.axes)


def _run_rule(call: Call, ctx: Ctx):
    spec = OPS.get(call.op)
    if spec is None:
        return "blocked", "blocks", Blocked(missing_reason(call.op))
    try:
        out = spec.channels(call, ctx)
    except Exception as e:  # noqa: BLE001 - a failing rule must freeze, never crash or guess
        return spec.name, "blocks", Blocked(f"rule {spec.name} failed: {type(e).__name__}: {e}")
    if not _fits(out, ctx.out_shape()):
        return spec.name, "blocks", Blocked(f"rule {spec.name} disagrees with the output shape")
    return spec.name, spec.kind, out


def propagate(gm: GraphModule, attention: str = "auto") -> Ctx:
    """Apply the rule table to every node; results land in ``ctx`` and ``node.meta``.

    ``attention``: ``"heads"`` / ``"auto"`` (whole attention heads are units) or ``"head_dim"`` (the head
    count is kept and ``head_dim`` pruned); see ``fxadapt.ops.heads``."""
    if attention not in ATTENTION_MODES:
        raise InputError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    batch = gm.meta.get(meta.BATCH, 1)
    shapes = {n.name: concrete_shape(n.meta.get("val"), batch) for n in gm.graph.nodes}
    ctx = Ctx(shapes, _Params(gm))
    ctx.attention = attention
    for node in gm.graph.nodes:
        ctx.node = node
        follow_ids(node, ctx)
        if node.op == "output":
            for v in node.all_input_nodes:
                ctx.freeze(ctx.track(v), "reaches the model output")
            continue
        call = normalize(node)
        if call is None:
            if node.op == "call_module":
                for v in node.all_input_nodes:
                    ctx.freeze(ctx.track(v), f"opaque module {node.target}")
            continue
        name, kind, out = _run_rule(call, ctx)
        ctx.fired[name] += 1
        if isinstance(out, Blocked):
            ctx.freeze_inputs(call, out.reason)
            node.meta[meta.RULE] = RuleRecord(name, "blocks", out.reason)
            out = None
        else:
            node.meta[meta.RULE] = RuleRecord(name, kind)
        ctx.tracks[node.name] = out
        node.meta[meta.TRACK] = out
    _tie_shared_params(ctx)
    return ctx


def _tie_shared_params(ctx: Ctx) -> None:
    """A parameter used by several ops (tied weights) is sliced once: its sites on one axis are coupled."""
    first: dict[tuple[str, int], np.ndarray] = {}
    for s in ctx.ledger.sites:
        if s.kind == "param" and s.ref is not None:
            labels = first.setdefault((s.ref.target, s.axis), s.labels)
            if labels is not s.labels and labels.shape == s.labels.shape:
                ctx.couple(labels, s.labels)


def labels_of(out: Any) -> list[np.ndarray]:
    if isinstance(out, Track):
        return [out.labels]
    if isinstance(out, tuple):
        return [t.labels for t in out if isinstance(t, Track)]
    return []
