"""Partial re-evaluation of a graph whose gates change one at a time: exact ablations at a fraction of the
forwards' cost.

Removing unit ``j`` of group ``g`` (or bypassing block ``b``) changes only what the calls of its gate module
reach: ``R(g)``, the nodes downstream of every ``call_module`` of ``fxadapt_gates.w{g}`` (``.d{b}``). One
full run of a batch records every node's value ``v_n`` (``torch.fx.Interpreter``); an ablation re-runs the
nodes of ``R(g)`` only, with ``v_n`` given for all others. The re-run nodes execute the same operations on
the same tensors as a full forward, so the output is the full forward's, bit for bit; the work saved is the
part of the network above the group's first site (a late group: most of it).

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


class Replay:
    """The recorded run of ``gm`` on ``inputs`` (``(args, kwargs)``) under the hooks active now;
    ``run(targets)`` re-runs what the ``call_module`` nodes of ``targets`` reach (module docstring)."""

    def __init__(self, gm: fx.GraphModule, inputs: tuple[tuple, dict], cap: int = CAP):
        self.gm = gm
        bound = _positional(gm, *inputs)
        self.args, self.kwargs = (bound, {}) if bound is not None else inputs
        self.env: dict[fx.Node, Any] | None = None
        self._down: dict[tuple, set[fx.Node]] = {}
        if bound is None:
            self.out = gm(*self.args, **self.kwargs)
            return
        rec = fx.Interpreter(gm, garbage_collect_values=False)
        self.out = rec.run(*self.args)
        size = sum(v.numel() * v.element_size() for n, v in rec.env.items()
                   if isinstance(v, torch.Tensor) and n.op != "get_attr")
        self.env = rec.env if size <= cap else None

    def downstream(self, targets: Iterable[str]) -> set[fx.Node]:
        """The nodes that read, directly or not, a call of a module in ``targets``."""
        key = tuple(sorted(targets))
        if key not in self._down:
            todo = [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target in key]
            seen: set[fx.Node] = set(todo)
            while todo:
                for u in todo.pop().users:
                    if u not in seen:
                        seen.add(u)
                        todo.append(u)
            self._down[key] = seen
        return self._down[key]

    def run(self, targets: Iterable[str]) -> Any:
        """The graph's output with the modules in ``targets`` (and all they reach) re-run."""
        if self.env is None:
            return self.gm(*self.args, **self.kwargs)
        dirty = self.downstream(targets)
        env = {n: v for n, v in self.env.items() if n not in dirty}
        return fx.Interpreter(self.gm).run(*self.args, initial_env=env)


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
