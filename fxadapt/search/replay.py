"""Partial re-evaluation of a graph whose gates change one at a time: exact ablations at a fraction of the
forwards' cost.

Removing unit ``j`` of group ``g`` (or bypassing block ``b``) changes only what the calls of its gate module
reach: ``R(g)``, the nodes downstream of every ``call_module`` of ``fxadapt_gates.w{g}`` (``.d{b}``). One
full run of a batch records every node's value ``v_n`` (``torch.fx.Interpreter``); an ablation re-runs the
nodes of ``R(g)`` only, with ``v_n`` given for all others. The re-run nodes execute the same operations on
the same tensors as a full forward, so the output is the full forward's, bit for bit; the work saved is the
part of the network above the group's first site (a late group: most of it).

``R(g)`` is compiled once per gate set into a ``GraphModule`` of its own (``Slice``: the nodes of ``R(g)``
in graph order, the values they read from outside it as inputs), shared by the recorded batches
(``slices``): the same calls in the same order as ``fx.Interpreter`` would make, without its per-node
dispatch (the digits base's ablation scores: 18% less CPU, ``bench/bench_importance_speed.py``).

The recording holds one value per node; a batch whose recording would exceed ``cap`` bytes is not recorded
(``Replay.run`` then runs the whole graph, as a plain forward does).

>>> import torch
>>> from torch import fx, nn
>>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
>>> x = torch.randn(5, 3)
>>> r = Replay(gm, ((x,), {}))
>>> torch.equal(r.run(["2"]), gm(x)), len(r.downstream(["2"]))     # only the last layer and the output
(True, 2)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx

CAP = 1 << 28      # bytes a batch's recording may hold


class Slice:
    """The nodes of ``gm`` that read, directly or not, a call of a module in ``targets``, compiled into a
    ``GraphModule`` (sharing ``gm``'s modules) whose inputs are the values they read from the other nodes
    (``inputs``) and whose output is ``gm``'s output (``None``: the targets do not reach it)."""

    def __init__(self, gm: fx.GraphModule, targets: tuple[str, ...]):
        self.gm = gm
        todo = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in targets]
        seen: set[fx.Node] = set(todo)
        while todo:
            for u in todo.pop().users:
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        self.dirty = seen
        self.order = [n for n in gm.graph.nodes if n in seen]
        self.inputs: list[fx.Node] = []
        known: set[fx.Node] = set()
        for n in self.order:
            new = [i for i in n.all_input_nodes if i not in seen and i not in known]
            self.inputs += new
            known.update(new)
        reaches = any(n.op == "output" for n in self.order)
        self.module = self._compile() if reaches else None

    def _compile(self) -> fx.GraphModule:
        g = fx.Graph()
        env = {i: g.placeholder(f"_in{k}") for k, i in enumerate(self.inputs)}
        for n in self.order:
            env[n] = g.node_copy(n, lambda a: env[a])
        return fx.GraphModule(self.gm, g)


class Replay:
    """The recorded run of ``gm`` on ``inputs`` (``(args, kwargs)``) under the hooks active now;
    ``run(targets)`` re-runs what the ``call_module`` nodes of ``targets`` reach (module docstring)."""

    def __init__(self, gm: fx.GraphModule, inputs: tuple[tuple, dict], cap: int = CAP,
                 slices: dict | None = None):
        self.gm = gm
        self.slices = slices if slices is not None else {}   # targets -> Slice, shareable between batches
        bound = _positional(gm, *inputs)
        self.args, self.kwargs = (bound, {}) if bound is not None else inputs
        self.env: dict[fx.Node, Any] | None = None
        if bound is None:
            self.out = gm(*self.args, **self.kwargs)
            return
        rec = fx.Interpreter(gm, garbage_collect_values=False)
        self.out = rec.run(*self.args)
        size = sum(v.numel() * v.element_size() for n, v in rec.env.items()
                   if isinstance(v, torch.Tensor) and n.op != "get_attr")
        self.env = rec.env if size <= cap else None

    def slice(self, targets: Iterable[str]) -> Slice:
        """The ``Slice`` of ``targets`` (built once per ``slices``)."""
        key = tuple(sorted(targets))
        if key not in self.slices:
            self.slices[key] = Slice(self.gm, key)
        return self.slices[key]

    def downstream(self, targets: Iterable[str]) -> set[fx.Node]:
        """The nodes that read, directly or not, a call of a module in ``targets``."""
        return self.slice(targets).dirty

    def run(self, targets: Iterable[str]) -> Any:
        """The graph's output with the modules in ``targets`` (and all they reach) re-run."""
        if self.env is None:
            return self.gm(*self.args, **self.kwargs)
        sl = self.slice(targets)
        if sl.module is None:
            return self.out
        return self.gm.graph.process_outputs(sl.module(*(self.env[n] for n in sl.inputs)))


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple | None:
    """``args`` and ``kwargs`` bound to ``gm.forward``'s parameters in order (None where they cannot be:
    the graph is then run as it is called)."""
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    if bound.kwargs or len(bound.args) != sum(n.op == "placeholder" for n in gm.graph.nodes):
        return None
    return tuple(bound.args)
