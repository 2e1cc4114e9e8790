"""Whether a view that splits the channel axis keeps whole heads (``fxadapt.ops.reshape.relayout``'s
``heads``).

Attention heads: a view ``[.., H*D] -> [.., H, D]`` whose output reaches an attention (``scaled_dot_product_
attention``, or a matrix product of two activations) through layout and element-wise ops splits heads. The
analysis' attention mode (``ctx.attention``, from ``fxadapt.analyze(..., attention=)``) picks the axis that
stays tracked:

- ``"heads"``: labels are unioned along ``D`` (and along any other split
  axis, e.g. the ``3`` of a fused ``[3, H, D]``), so a unit is one whole head of ``D`` channels; ``head_dim``
  stays fixed, which rotary embeddings need (they pair positions ``i`` and ``i + D/2``). Attention couples
  the heads of q, k and v; with grouped-query attention (``repeat_kv``'s ``expand + reshape``, or
  ``enable_gqa``) every kv head is unioned with its ``H_q / H_kv`` query heads, so whole groups go together.
- ``"head_dim"``: labels are unioned along every split axis but the innermost (``H`` kept, ``D`` pruned).
- ``"auto"`` (the default): ``heads`` where the model applies rotary embeddings on the way from the split to
  the attention (the last axis is sliced/concatenated: ``rotate_half``), where pruning ``head_dim`` would
  break the frequency pairs; elsewhere ``AUTO_WITHOUT_ROTARY`` (``head_dim``: the finer granularity and
  fxadapt's earlier behaviour; set it to ``"heads"`` to remove whole heads everywhere).

Head folds: a view ``[B, T, H, D] -> [B*T*H, D]`` (or ``[B, T, H*D] -> [B*T*H, D]``) folds the head axis
into the rows, so that a per-row op (a gated RMSNorm over ``D``: ``norm(x) * silu(z)``, as gated delta-nets
apply it) treats every head alone; ``.view(B, T, H*D)`` unfolds it. Row ``r`` of the fold holds head
``r mod H``: with whole heads as units, the fold's labels along the rows are the head labels repeated, and
both operands of the gated product carry them on the same axis. A fold is therefore decided like an
attention split: a split whose value reaches a fold counts as reaching an attention, and a view that splits
and folds at once keeps the head part (the rows) tracked under the same condition. Under ``"head_dim"`` both
sides keep ``D`` tracked instead; either way the two operands agree.
"""

from __future__ import annotations

import math
from collections import deque

import sympy
from torch.fx import Node

from fxadapt.ops.core import Call, Ctx, aten_ops, norm_dim
from fxadapt.ops.registry import OPS, op_of

ATTENTION_MODES = ("auto", "heads", "head_dim")
DEFAULT_ATTENTION = "auto"


def attention_mode(ctx: Ctx) -> str:
    """The analysis' attention mode: ``"heads"``, ``"head_dim"`` or ``"auto"``."""
    return getattr(ctx, "attention", DEFAULT_ATTENTION)


AUTO_WITHOUT_ROTARY = "head_dim"
"""What ``"auto"`` picks for attention without rotary embeddings (with them it is always ``"heads"``)."""

_ATTENTION_OPS = aten_ops("scaled_dot_product_attention.default")
_PRODUCTS = aten_ops("matmul.default", "bmm.default")
_LAST_AXIS_SPLITS = {**{op: 1 for op in aten_ops("slice.Tensor", "narrow.default")},
                     **{op: 2
                        for op in aten_ops("split.Tensor", "split_with_sizes.default", "chunk.default")}}
_CATS = aten_ops("cat.default")
_COMPLEX = aten_ops("view_as_complex.default")


def attention_split(node: Node) -> tuple[bool, bool]:
    """(reaches attention, rotary): whether ``node``'s value reaches an attention (sdpa, or a product of two
    activations) or a head fold (``folds_heads``) through layout and element-wise ops only, and whether on
    the way its last axis (``head_dim``) is both sliced and concatenated, as rotary embeddings'
    ``rotate_half`` does.

    The walk (breadth first, so the nearest attention answers) has no depth limit: how many free ops lie
    between a split and its attention is the model's choice. A gated delta-net's chunked path (Qwen3-Next)
    puts 12 between its ``beta`` view and the product: split, getitem, reshape, sigmoid, tensor_split,
    getitem, transpose, a dtype cast, pad, unsqueeze, the product with the values, reshape; the former
    look-ahead of 12 stopped one short, kept ``head_dim`` units there, and the product with the value heads
    then merged the two key heads into one unit. The walk is bounded by the region it may enter instead: it
    stops at every op with a cost (a linear, a matmul: where channels are contracted) and at every op that
    is not layout or element-wise, and visits each node once, so one walk costs at most the number of nodes
    of that region, and never more than the graph's."""
    frontier, seen, touched, folded = deque(node.users), set[Node](), set[str](), False
    while frontier:
        u = frontier.popleft()
        if u in seen:
            continue
        seen.add(u)
        op = op_of(u)
        if op in _ATTENTION_OPS or (op in _PRODUCTS and all(
                getattr(a, "op", "") not in ("get_attr", "") for a in u.args[:2])):
            return True, touched == {"slice", "cat"}
        folded = folded or folds_heads(u)    # the walk goes on: a rotary further on still counts
        if _touches_last_axis(u, op):
            touched.add("cat" if op in _CATS else "slice")
        if op in _COMPLEX:              # rotary as a complex product (Llama 4): pairs within head_dim
            touched.update(("slice", "cat"))
        spec = OPS.get(op)
        if spec is not None and spec.kind in ("reindexes", "passes", "couples") and spec.cost is None:
            frontier.extend(u.users)
    return folded, touched == {"slice", "cat"}


def _touches_last_axis(node: Node, op) -> bool:
    if op in _LAST_AXIS_SPLITS or op in _CATS:
        pos = _LAST_AXIS_SPLITS.get(op, 1)
        dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", 0)
        val = node.meta.get("val")
        nd = len(val[0].shape if isinstance(val, (list, tuple)) else val.shape) if val is not None else 0
        return isinstance(dim, int) and nd >= 4 and norm_dim(dim, nd) == nd - 1  # [B, H, S, D]
    return False


def _dims(node: Node) -> list | None:
    """The sizes of a node's value as sympy expressions (a symbolic batch stays a symbol)."""
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    return [d.node.expr if hasattr(d, "node") else sympy.Integer(int(d)) for d in shape]


def folds_heads(node: Node) -> bool:
    """Whether ``node`` is a head fold (module docstring): a view ``[.., H, D] -> [.., N*H, D]`` that merges
    the axis before the last (the heads) with at least one leading axis and keeps the last, or a view
    ``[.., H*D] -> [.., N*H, D]`` that splits the last axis and merges its outer part into the rows."""
    if op_of(node) not in _VIEWS or not node.args:
        return False
    src = node.args[0]
    ins, outs = _dims(src) if isinstance(src, Node) else None, _dims(node)
    if ins is None or outs is None or len(outs) < 2 or len(outs) >= len(ins):
        return False
    lead, heads = ins[len(outs) - 2:-1], sympy.simplify(ins[-1] / outs[-1])
    if heads == 1:   # the head axis must hold heads: a size-1 group axis (Mamba-2's norm) merges nothing
        return len(lead) >= 2 and lead[-1] != 1 and sympy.expand(math.prod(lead) - outs[-2]) == 0
    return bool(heads.is_Integer and heads > 1 and len(lead) >= 1
                and sympy.expand(math.prod(lead) * heads - outs[-2]) == 0)


def heads_split(call: Call, ctx: Ctx) -> bool:
    """Whether this view splits attention heads that are to be kept whole (see module docstring)."""
    mode = attention_mode(ctx)   # a view that keeps the rank can split heads too: GPT-BigCode's multi-query
    # attention views its query [B, 1, S, H*D] (an unsqueeze before the split) as [B, S, H, D]
    if mode == "head_dim":
        return False
    if len(ctx.out_shape() or ()) < len(ctx.shape(call.arg(0, "self")) or ()):
        # only a view that splits the channel axis and folds its outer part into the rows (a head fold of
        # [B, T, H*D]) has a choice to make; it is made like an attention split's
        reaches = folds_heads(call.node)
    else:
        reaches, _ = attention_split(call.node)
    return reaches \
            and (mode == "heads" or AUTO_WITHOUT_ROTARY == "heads" or _model_rotary(ctx, call.node.graph))


_VIEWS = aten_ops("view.default", "reshape.default", "_unsafe_view.default", "unflatten.int")


def _model_rotary(ctx: Ctx, graph) -> bool:
    """Whether any attention of the model applies rotary embeddings (cached on ``ctx``): ``auto`` then keeps
    every attention's heads whole (q, k and v of one attention must agree)."""
    if getattr(ctx, "_rotary", None) is None:
        setattr(ctx, "_rotary", any(attention_split(n)[1] for n in graph.nodes if op_of(n) in _VIEWS))  # noqa: B010
    return bool(getattr(ctx, "_rotary"))  # noqa: B009


