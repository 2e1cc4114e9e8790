"""Forward-use evidence: the size attributes a module's forward reads into the size arguments the plan edited.

For every module whose own view/split sizes the plan edited (and that runs no attention call, whose head
sizes ``widths`` measures directly), a copy of the original model runs once eagerly with that module's int
attributes read as ``sized.Sized`` ints named ``(path, attr)``, and every torch call whose size arguments
hold one is recorded (a ``TorchFunctionMode``): ``torch.split(x, [key_dim, key_dim, value_dim])`` records
the sizes ``[32, 32, 64]`` with the polynomials ``key_dim``, ``key_dim``, ``value_dim``. The graph's calls
in the same module with the same old sizes give the new ones (the view/split argument at the same
position, when every such call agrees): each recorded position is an equation ``poly(attrs) = new``,
solved by ``sized.solve``:

    used[path][attr] = the value the graph's sizes require of an attribute the forward reads into them

A used attribute keeps its value where the sizes it feeds are kept (a head size read into
``reshape(b, s, -1, head_k_dim)``), whatever value coincidences with changed sizes suggest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.fx import GraphModule
from torch.overrides import TorchFunctionMode

from fxadapt.writeback.sized import Sized, solve
from fxadapt.writeback.widths import SIZED, module_stack

aten = torch.ops.aten
VIEWS = {**SIZED, aten._unsafe_view.default: 1, aten.expand.default: 1}


def _sizes(a) -> bool:
    """A size list holding a ``Sized``: ints only (no bool), at least one named."""
    if not isinstance(a, (list, tuple)) or not a:
        return False
    return all(type(x) is int or isinstance(x, Sized) for x in a) and any(isinstance(x, Sized) for x in a)


class _Record(TorchFunctionMode):
    """Every torch call's size lists that hold a ``Sized`` (varargs sizes as one list)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for start in (0, 1):
            if _sizes(tuple(args[start:])):
                self.calls.append(tuple(args[start:]))
        self.calls += [tuple(a) for a in (*args, *kwargs.values()) if _sizes(a)]
        return func(*args, **kwargs)


def _tagging(cls: type, path: str) -> type:
    """A subclass of ``cls`` whose instance int attributes read as ``Sized`` named ``(path, attr)``."""
    def __getattribute__(self, name):
        v = cls.__getattribute__(self, name)
        if type(v) is int and name in object.__getattribute__(self, "__dict__"):
            return Sized(v, {((path, name),): 1})
        return v
    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__})


def edited_paths(gm: GraphModule, base: GraphModule) -> list[str]:
    """Modules whose own view/split sizes the plan edited and that run no attention call."""
    old_nodes = {n.name: n for n in base.graph.nodes}
    edited, attention = set(), set()
    for node in gm.graph.nodes:
        stack, old = module_stack(node), old_nodes.get(node.name)
        if not stack or old is None:
            continue
        if node.target == aten.scaled_dot_product_attention.default:
            attention.add(stack[-1])
        k = VIEWS.get(node.target)
        if k is not None and len(node.args) > k and isinstance(node.args[k], (list, tuple)) \
                and isinstance(old.args[k], (list, tuple)) and list(node.args[k]) != list(old.args[k]):
            edited.add(stack[-1])
    return sorted(edited - attention)


def _graph_sizes(gm: GraphModule, base: GraphModule) -> dict[str, list[tuple[tuple, tuple]]]:
    """Per module path: (old sizes, new sizes) of its view/split calls."""
    old_nodes = {n.name: n for n in base.graph.nodes}
    out: dict[str, list] = {}
    for node in gm.graph.nodes:
        k, old, stack = VIEWS.get(node.target), old_nodes.get(node.name), module_stack(node)
        if k is None or old is None or not stack or len(node.args) <= k:
            continue
        a, b = old.args[k], node.args[k]
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            out.setdefault(stack[-1], []).append((tuple(a), tuple(b)))
    return out


def forward_uses(probe: nn.Module, run: Callable[[], object], gm: GraphModule,
                 base: GraphModule) -> dict[str, dict[str, int]]:
    """``{path: {attr: value}}``: the attributes of the modules ``edited_paths`` names that their forward
    reads into size arguments, with the values the graph's sizes require (``probe``: a copy of the original
    model, ``run``: its forward at the example inputs; empty where it does not run)."""
    paths = [p for p in edited_paths(gm, base) if has_module(probe, p)]
    if not paths:
        return {}
    mods = {p: probe.get_submodule(p) for p in paths}
    classes = {p: type(m) for p, m in mods.items()}
    rec = _Record()
    try:
        for p, m in mods.items():
            m.__class__ = _tagging(classes[p], p)
        with torch.no_grad(), rec:
            run()
    except Exception:  # noqa: BLE001 - no evidence where the probe does not run
        return {}
    finally:
        for p, m in mods.items():
            m.__class__ = classes[p]
    return _solved(rec.calls, _graph_sizes(gm, base))


def _solved(calls: list[tuple], graph: dict) -> dict[str, dict[str, int]]:
    eqs: dict[str, list] = {}
    for sizes in calls:
        path = next((n[0] for x in sizes if isinstance(x, Sized) for m in x.poly for n in m), None)
        if path is None:
            continue
        olds = tuple(int(x) for x in sizes)
        news = [b for a, b in graph.get(path, ()) if a == olds]
        for i, x in enumerate(sizes):
            vals = {b[i] for b in news}
            if isinstance(x, Sized) and len(vals) == 1 and type(next(iter(vals))) is int:
                eqs.setdefault(path, []).append((x.poly, next(iter(vals))))
    out = {}
    for path, system in eqs.items():
        found = solve(system, {})
        if found:
            out[path] = {attr: v for (p, attr), v in found.items() if p == path}
    return out


def has_module(model: nn.Module, path: str) -> bool:
    """Whether ``model`` has a submodule at ``path``."""
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
