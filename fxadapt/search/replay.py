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

Copies (``Replay.run_copies``): ``k`` changes of the same gates in one run of ``R(g)`` on ``k x N`` samples,
copy ``c`` the rows ``[cN, (c + 1)N)``. Two probe runs (the batch's first sample repeated once and twice) say
how every recorded value scales with the batch: a tensor whose dim 0 is ``N x`` the one-sample one is per
sample (repeated ``k`` times), an int that is ``N x`` (a batch size read from a shape) is multiplied by ``k``,
a value the same in both is shared. The gates' calls hold one value per copy, and every node reading such
values runs once per copy on its copy's rows (one ``torch.vmap`` over the copies where it maps, a per-sample
result concatenated back); an input only such nodes read is not repeated, and a ``SiteMask`` or ``mul`` by
recorded ones returns its input (``x * 1 == x``). In eval mode every op is per sample, so copy ``c`` computes
what a run with the gates' value ``c`` computes (bit for bit where the kernels do not depend on the batch
size; the digits base and a tiny GPT-2: identical). A run holds ``k`` times a copy's values: ``k`` is capped
by ``copies`` (``COPIES_CAP`` bytes). A graph whose probe says a region node reads other samples (a value
shared by the copies computed from per-sample ones, as a mean over the batch) or that it cannot classify is
not run as copies. The digits base's scores: 21% less CPU (``bench/bench_importance_speed.py``: 2.96 ->
2.34 s; the convolutions are then 60% of it).

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
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg

from fxadapt.passes.insert_gates import SiteMask

CAP = 1 << 28      # bytes a batch's recording may hold
COPIES_CAP = 1 << 30   # bytes the per-sample values of one run of copies may hold


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
        self.grows: dict[fx.Node, Callable | None] | None = None    # per node: its k-copy value (probed)
        self.looped: set[fx.Node] = set()    # nodes ``torch.vmap`` did not run (``_split``)

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

    def copies(self, targets: Iterable[str]) -> int:
        """How many copies one ``run_copies`` of ``targets`` may hold (0: it cannot run them; ``run``)."""
        plan = self._plan(tuple(sorted(targets)))
        return 0 if plan is None else plan.most

    def run_copies(self, targets: Iterable[str], values: list) -> Any:
        """The graph's output on ``len(values)`` copies of the batch (copy-major), the calls of the modules
        in ``targets`` returning ``values[c]`` in copy ``c`` (module docstring); needs ``copies(targets)``."""
        key = tuple(sorted(targets))
        plan, k = self._plan(key), len(values)
        assert plan is not None and self.env is not None and k <= plan.most, "run_copies: check copies()"
        sl, grows, rec = self.slices[key], self.grows or {}, self.env
        env = {n: rec[n] if n in plan.shared else _must(grows[n])(rec[n], k) for n in sl.inputs}
        for n, done in zip(sl.order, plan.last):
            if n.op == "output":
                return self.gm.graph.process_outputs(map_arg(n.args[0], env.__getitem__))
            if n.op == "call_module" and n.target in key:
                env[n] = _PerCopy(values)
            elif n in plan.split:
                env[n] = self._split(n, env, k, plan)
            elif n in plan.same:
                env[n] = env[plan.same[n]]
            else:
                env[n] = self._call(n, env)
            for d in done:      # values read for the last time: freed, as the compiled slice does
                del env[d]
        return self.out

    def _call(self, n: fx.Node, env: dict, pick: Callable = lambda _a, v: v) -> Any:
        args = map_arg(n.args, lambda a: pick(a, env[a]))
        kwargs = map_arg(n.kwargs, lambda a: pick(a, env[a]))
        if n.op == "call_module":
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        return _must(n.target)(*args, **kwargs)

    def _split(self, n: fx.Node, env: dict, k: int, plan: Copies) -> Any:
        """Node ``n`` once per copy: a value per copy taken as it is, a per-sample one as the copy's rows."""
        def pick(c):
            def get(a, v):
                if isinstance(v, _PerCopy):
                    return v.values[c]
                if self._rows(a, plan):
                    return v.narrow(0, c * (v.shape[0] // k), v.shape[0] // k)
                return self._one(a, v, k)
            return get
        rows = plan.split[n]
        if rows and n not in self.looped:
            try:
                return self._mapped(n, env, k, plan)
            except Exception:   # noqa: BLE001 - an op vmap does not batch: once per copy from now on
                self.looped.add(n)
        outs = [self._call(n, env, pick(c)) for c in range(k)]
        return torch.cat(outs) if rows else _PerCopy(outs)

    def _mapped(self, n: fx.Node, env: dict, k: int, plan: Copies) -> torch.Tensor:
        """``_split`` of a per-sample node as one ``torch.vmap`` over the copies (the same elementwise
        operations, bit for bit)."""
        nodes = [a for a in n.all_input_nodes if isinstance(env[a], _PerCopy) or self._rows(a, plan)]
        stacked = [torch.stack(env[a].values) if isinstance(env[a], _PerCopy)
                   else env[a].view(k, -1, *env[a].shape[1:]) for a in nodes]

        def one(*vals):
            at = dict(zip(nodes, vals))
            return self._call(n, env, lambda a, v: at[a] if a in at else self._one(a, v, k))
        out = torch.vmap(one)(*stacked)
        return out.reshape(-1, *out.shape[2:])

    def _one(self, a: fx.Node, v: Any, k: int) -> Any:
        """Node ``a``'s value ``v`` in a run of ``k`` copies as one copy sees it (a batch size over ``k``)."""
        return v // k if self.grows is not None and self.grows[a] is _times else v

    def _rows(self, a: fx.Node, plan: Copies) -> bool:
        """Whether ``a``'s value in a run of copies holds per-copy rows (a shared input is not repeated)."""
        return self.grows is not None and self.grows[a] is _repeat and a not in plan.shared

    def _plan(self, key: tuple[str, ...]) -> Copies | None:
        """How to run copies of ``key``'s slice: probed and planned once per ``slices`` and input shapes (the
        batches of one scoring share their gates' values)."""
        if self.env is None:
            return None
        sig = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else repr(a) for a in self.args)
        if ("probe", sig) not in self.slices:
            self.slices[("probe", sig)] = _probe(self.gm, self.args, self.env)
        self.grows = self.slices[("probe", sig)]
        if ("plan", sig, key) not in self.slices:
            self.slices[("plan", sig, key)] = self._make_plan(key)
        return self.slices[("plan", sig, key)]

    def _make_plan(self, key: tuple[str, ...]) -> Copies | None:
        sl, rec = self.slice(key), self.env
        if sl.module is None or rec is None or self.grows is None:
            return None
        grows: dict[fx.Node, Callable | None] = self.grows
        per_copy: set[fx.Node] = set()
        split: dict[fx.Node, bool] = {}
        if any(grows.get(n) is None for n in sl.inputs):
            return None
        for n in sl.order:
            if n.op == "call_module" and n.target in key:
                per_copy.add(n)
            elif any(a in per_copy for a in n.all_input_nodes):
                if n.op == "output" or grows.get(n) not in (_repeat, _same):
                    return None
                split[n] = grows[n] is _repeat
                if not split[n]:
                    per_copy.add(n)
            elif n.op != "output" and not _per_sample(n, grows, rec):
                return None     # e.g. a reduction over the batch: the copies would mix
        size = sum(_bytes(rec[n]) for n in (*sl.inputs, *sl.order) if n in rec and grows.get(n) is _repeat)
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(sl.order):
            for a in n.all_input_nodes:
                last[a] = i
        done: list[list[fx.Node]] = [[] for _ in sl.order]
        for a, i in last.items():
            done[i].append(a)
        same = {n: x for n in sl.order if n not in split for x in [self._unchanged(n, sl)] if x is not None}
        shared = {n for n in sl.inputs
                  if grows[n] is _repeat and all(u in split for u in n.users if u in sl.dirty)}
        return Copies(split, max(1, COPIES_CAP // max(size, 1)), done, same, shared)

    def _unchanged(self, n: fx.Node, sl: Slice) -> fx.Node | None:
        """The input that node ``n`` returns as it is: a ``SiteMask`` or ``aten.mul`` by a recorded all-ones
        tensor of ``n``'s shape and dtype (``x * 1 == x``, bit for bit)."""
        rec = self.env or {}
        if n.op == "call_module" and isinstance(self.gm.get_submodule(str(n.target)), SiteMask):
            pairs = [tuple(n.args[:2])]
        elif n.op == "call_function" and n.target is torch.ops.aten.mul.Tensor and len(n.args) == 2:
            pairs = [tuple(n.args), tuple(n.args[::-1])]
        else:
            return None
        for x, m in pairs:
            if not (isinstance(x, fx.Node) and isinstance(m, fx.Node)) or m in sl.dirty:
                continue
            v, ones, out = rec.get(x), rec.get(m), rec.get(n)
            if not (isinstance(v, torch.Tensor) and isinstance(ones, torch.Tensor)
                    and isinstance(out, torch.Tensor)):
                continue
            if out.shape == v.shape and out.dtype == v.dtype and bool((ones == 1).all()):
                return x
        return None


class Copies:
    """How ``Replay.run_copies`` runs a slice: ``split`` the nodes run once per copy (True: their copies'
    per-sample results concatenated; False: a value per copy), ``most`` copies per run, ``last[i]`` the
    values the slice's node ``i`` reads for the last time, ``same`` the nodes that return an input as it is
    (``Replay._unchanged``), ``shared`` the inputs only such nodes read (not repeated: the same in every
    copy)."""

    def __init__(self, split: dict[fx.Node, bool], most: int, last: list[list[fx.Node]],
                 same: dict[fx.Node, fx.Node], shared: set[fx.Node]):
        self.split, self.most, self.last, self.same, self.shared = split, most, last, same, shared


class _PerCopy:
    def __init__(self, values: list):
        self.values = values


def _per_sample(n: fx.Node, grows: dict, rec: dict) -> bool:
    """Whether node ``n`` grows with the copies as probed, reading no other sample than its own: a value
    shared by the copies that is a tensor read from per-sample tensors (a reduction over the batch) is not."""
    if grows.get(n) is None:
        return False
    return not (grows[n] is _same and isinstance(rec.get(n), torch.Tensor)
                and any(grows.get(a) is _repeat for a in n.all_input_nodes))


def _must(f: Any) -> Callable:
    assert callable(f)
    return f


def _bytes(v: Any) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def _repeat(v: torch.Tensor, k: int) -> torch.Tensor:
    return v.repeat(k, *([1] * (v.dim() - 1)))


def _times(v: int, k: int) -> int:
    return v * k


def _same(v: Any, k: int) -> Any:
    return v


def _first_rows(args: tuple, n: int, r: int) -> tuple:
    """``args`` with every per-sample tensor (dim 0 of ``n``) as its first row repeated ``r`` times."""
    return tuple(_repeat(a[:1], r) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a
                 for a in args)


def _probe(gm: fx.GraphModule, args: tuple, env: dict) -> dict[fx.Node, Callable | None]:
    """Per recorded node, how its value grows to ``k`` copies of the batch (module docstring; None:
    unknown)."""
    n = next((int(a.shape[0]) for a in args if isinstance(a, torch.Tensor) and a.dim()), 1)
    envs = []
    for r in (1, 2):
        rec = fx.Interpreter(gm, garbage_collect_values=False)
        rec.run(*_first_rows(args, n, r))
        envs.append(rec.env)
    return {node: _grow(envs[0].get(node), envs[1].get(node), v, n) for node, v in env.items()}


def _grow(one: Any, two: Any, v: Any, n: int) -> Callable | None:
    """How ``v`` (the value at ``n`` samples; ``one``, ``two``: at 1 and 2) grows to ``k`` copies."""
    if isinstance(v, torch.Tensor):
        if not (isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor)):
            return None
        s1, s2, sv = tuple(one.shape), tuple(two.shape), tuple(v.shape)
        if s1 == s2 == sv:
            return _same
        if s1 and s1[0] > 0 and s2 == (2 * s1[0], *s1[1:]) and sv == (n * s1[0], *s1[1:]):
            return _repeat
        return None
    if isinstance(v, (list, tuple)):
        if not (isinstance(one, (list, tuple)) and isinstance(two, (list, tuple))
                and len(one) == len(two) == len(v)):
            return None
        got = [_grow(a, b, c, n) for a, b, c in zip(one, two, v)]
        fs = [f for f in got if f is not None]
        if len(fs) < len(got):
            return None
        if all(f is _same for f in fs):
            return _same
        return lambda v, k: type(v)([f(x, k) for f, x in zip(fs, v)])
    if isinstance(v, int) and not isinstance(v, bool) and isinstance(one, int) and isinstance(two, int):
        if one != two and two == 2 * one and v == n * one:
            return _times
    try:
        return _same if bool(one == two == v) else None
    except Exception:   # noqa: BLE001 - a value that does not compare: unknown
        return None


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
