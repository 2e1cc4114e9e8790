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
        entry = idom[node.name]
        if entry == SOURCE:
            continue
        body = (nx.descendants(g, entry) & nx.ancestors(g, node.name)) - {node.name}
        if not _single_entry_exit(g, body, entry, node.name):
            continue
        identity = entry in (ops[0].name, ops[1].name) and ops[0].name != ops[1].name
        same = _shape(nodes[entry]) == _shape(node) and _shape(node) is not None
        reason = None if identity and same else (
            "skip path is not the identity (projection shortcut)" if not identity
            else "residual add broadcasts: input and output shapes differ")
        order = [n.name for n in gm.graph.nodes if n.name in body]
        blocks.append(Block(len(blocks), entry, node.name, tuple(order), identity and same,
                            identity and same, reason))
    return blocks


def _single_entry_exit(g: nx.DiGraph, body: set, entry: str, exit_: str) -> bool:
    if not body:
        return False
    inside = body | {entry}
    for n in body:
        if any(p not in inside for p in g.predecessors(n)):
            return False
        if any(s not in body and s != exit_ for s in g.successors(n)):
            return False
    return True
