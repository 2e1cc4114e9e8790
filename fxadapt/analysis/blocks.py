"""Residual blocks found by dominance, not by names.

The data-flow graph of tensor-valued nodes (a virtual source feeds every placeholder) is a networkx
``DiGraph``. For every ``add(u, v)`` node ``a``, its immediate dominator ``d`` is the block entry. The body
is every node on a path from ``d`` to ``a``: ``descendants(d) & ancestors(a)``. It is a single-entry /
single-exit region when no body node reads a tensor from outside ``body | {d}`` and none is read outside
``body | {a}``. Then ``a = d + f(d)`` when one operand *is* ``d`` (identity skip):

- removable: ``y = x + f(x) -> y = x`` is exact when ``shape(y) == shape(x)`` (no broadcasting);
- repeatable: additionally ``f`` maps ``shape(x)`` to ``shape(x)``, so a copy ``y' = y + f'(y)`` can be
  inserted after the block; with ``f' == 0`` at insertion (last op's output zeroed) the function is kept.

Adds whose two operands both leave ``d`` through computation (projection shortcuts) are reported as
blocks that are not removable, with the reason.

Side inputs: a transformer layer's attention reads tensors computed from the model inputs beside the
residual stream (the attention mask, rotary ``cos``/``sin``, position ids), so the add's dominator is the
graph source. When one operand ``u`` of the add is an ancestor of the other (``a = u + f(u)``), ``u`` is
tried as the entry: the body is ``descendants(u) & ancestors(a)``; a body node may then read *side
inputs*, tensors from outside the body that do not depend on ``u`` (they are defined before the body, so a
removed block drops its reads and a repeated copy reads the same tensors); nothing in the body may be read
outside it. A region without any parametric op (``x + 0.044715 * x**3`` inside a tanh-GELU) is no layer:
it is reported, not removable.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from fxadapt.ops.registry import spec_of

SOURCE = "__source__"


@dataclass(frozen=True)
class Block:
    """A residual region ``exit = entry + f(entry)`` (``body`` = the nodes computing ``f``)."""

    id: int
    entry: str
    exit: str
    body: tuple[str, ...]
    removable: bool
    repeatable: bool
    reason: str | None = None


def is_tensor_node(node: Node) -> bool:
    val = node.meta.get("val")
    if node.op == "get_attr":
        return False
    if node.op in ("placeholder", "output"):
        return True
    return isinstance(val, torch.Tensor) or (isinstance(val, (list, tuple)) and any(
        isinstance(v, torch.Tensor) for v in val))


def dataflow_graph(gm: GraphModule) -> nx.DiGraph:
    """Tensor data flow between nodes, with a virtual source before the placeholders."""
    g = nx.DiGraph()
    g.add_node(SOURCE)
    for node in gm.graph.nodes:
        if not is_tensor_node(node):
            continue
        g.add_node(node.name)
        if node.op == "placeholder":
            g.add_edge(SOURCE, node.name)
        for inp in node.all_input_nodes:
            if is_tensor_node(inp):
                g.add_edge(inp.name, node.name)
    out = next(n.name for n in reversed(gm.graph.nodes) if n.op == "output")
    live = nx.ancestors(g, out) | {out}
    g.remove_nodes_from([n for n in list(g.nodes) if n not in live])
    return g


def _shape(node: Node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def find_blocks(gm: GraphModule, g: nx.DiGraph) -> list[Block]:
    nodes = {n.name: n for n in gm.graph.nodes}
    idom = nx.immediate_dominators(g, SOURCE)
    blocks: list[Block] = []
    for node in gm.graph.nodes:
        spec = spec_of(node)
        if node.op != "call_function" or spec is None or not spec.sums or node.name not in idom:
            continue
        ops = [a for a in node.args[:2] if isinstance(a, Node)]
        if len(ops) != 2 or node.kwargs.get("alpha", 1) != 1:
            continue
        found = _region(g, idom, node.name, ops)
        if found is None:
            continue
        entry, body = found
        identity = entry in (ops[0].name, ops[1].name) and ops[0].name != ops[1].name
        same = _shape(nodes[entry]) == _shape(node) and _shape(node) is not None
        layer = any(getattr(spec_of(nodes[n]), "zero", None) == "params" for n in body)
        reason = None if identity and same and layer else (
            "skip path is not the identity (projection shortcut)" if not identity
            else "residual add broadcasts: input and output shapes differ" if not same
            else "no parametric layer in the residual branch")
        ok = reason is None
        order = [n.name for n in gm.graph.nodes if n.name in body]
        blocks.append(Block(len(blocks), entry, node.name, tuple(order), ok, ok, reason))
    return blocks


def _region(g: nx.DiGraph, idom: dict, exit_: str, ops: list) -> tuple[str, set] | None:
    """(entry, body) of the residual region closed by ``exit_``: by dominance, else with side inputs."""
    entry = idom[exit_]
    if entry != SOURCE:
        body = (nx.descendants(g, entry) & nx.ancestors(g, exit_)) - {exit_}
        if _single_entry_exit(g, body, entry, exit_):
            return entry, body
    a, b = ops[0].name, ops[1].name
    for u, v in ((a, b), (b, a)):
        if u != v and u in g and v in g and u in nx.ancestors(g, v):
            body = (nx.descendants(g, u) & nx.ancestors(g, exit_)) - {exit_}
            if _single_entry_exit(g, body, u, exit_, side_inputs=True):
                return u, body
    return None


def _single_entry_exit(g: nx.DiGraph, body: set, entry: str, exit_: str, side_inputs: bool = False) -> bool:
    """No body node is read outside ``body | {exit_}``; without ``side_inputs`` none reads from outside
    ``body | {entry}`` either (with them, outside reads are by construction independent of ``entry``)."""
    if not body:
        return False
    inside = body | {entry}
    for n in body:
        if not side_inputs and any(p not in inside for p in g.predecessors(n)):
            return False
        if any(s not in body and s != exit_ for s in g.successors(n)):
            return False
    return True
