"""Shape propagation on the ``meta`` device: the fast path of ``shape_check(..., fake=True)``.

Every tensor the graph reads (inputs, parameters, buffers, constants) is replaced by a ``meta`` tensor of its
shape and dtype, a factory op's ``device=`` reads ``meta``, and a lifted module is called with its tensors
swapped for meta ones (``torch.func.functional_call``). Output shapes and dtypes are those of the ops' meta
kernels, which ``FakeTensorMode`` runs too, without its per-op bookkeeping (cache keys, a fake copy of every
parameter): on resnet50 a run costs ~0.02 s where fake tensors cost ~0.3 s.

Most ops' meta kernels are Python (``torch._refs``, ``torch._meta_registrations``: a batch norm or a
clamp costs ~1 ms), and a graph repeats the same op on the same shapes many times, so the run goes through
a dispatch cache (``MetaCache``) keyed by the op and its arguments' metadata (shapes, strides, dtypes,
storage offsets, every non-tensor argument): a hit makes fresh meta tensors of the recorded output shapes,
strides and dtypes, what the kernel made for the same key. Only ops whose outputs depend on nothing else
are cached: functional ops that return new tensors (no views, no mutated argument, no random or
value-dependent output) and in-place pointwise ops (their output is their first argument); any other op,
a key that cannot be hashed and a kernel that raises (a shape mismatch) run the kernel every time.

It decides nothing on its own: anything it cannot run (an op without a meta kernel, a value-dependent op,
a module ``functional_call`` cannot swap) returns False, and ``shape_check`` runs the fake-tensor check,
whose verdict (or ``ShapeCheckError``) stands.

Example:
    >>> import torch
    >>> from fxadapt import capture
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> gm = capture(net, (torch.randn(1, 3, 8, 8),))
    >>> run_on_meta(gm, [torch.randn(2, 3, 8, 8)])
    True
    >>> [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_module"][-1]
    (2, 8, 6, 6)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Interpreter
from torch.utils._python_dispatch import TorchDispatchMode

_META = torch.device("meta")
_LIMIT = 50_000   # cache entries kept (a few hundred per model); the cache is emptied when full
_KINDS: dict[Any, str | None] = {}   # op -> how it is cached (``_kind``)
_ENTRIES: dict[tuple, tuple] = {}    # (op, argument metadata) -> (several outputs?, their metadata)


def to_meta(v: Any) -> Any:
    """``v`` with every tensor (at any depth of lists / tuples) a meta tensor of its shape and dtype."""
    if isinstance(v, torch.Tensor):
        return v if v.is_meta else torch.empty(v.shape, dtype=v.dtype, device=_META)
    if isinstance(v, (list, tuple)):
        return type(v)(to_meta(x) for x in v) if isinstance(v, list) else tuple(to_meta(x) for x in v)
    return v


class _MetaRecorder(Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        if n.op != "output":
            n.meta["val"] = to_meta(out)
        return out

    def fetch_attr(self, target: str):
        return to_meta(super().fetch_attr(target))

    def call_function(self, target, args, kwargs):
        if "device" in kwargs:
            kwargs = {**kwargs, "device": _META}
        if any(isinstance(a, torch.device) for a in args):   # aten.to.device(x, device, dtype, ...)
            args = tuple(_META if isinstance(a, torch.device) else a for a in args)
        return super().call_function(target, args, kwargs)

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        tensors = {name: to_meta(t) for name, t in [*mod.named_parameters(), *mod.named_buffers()]}
        return torch.func.functional_call(mod, tensors, tuple(args), dict(kwargs), tie_weights=False)


def _key(v: Any) -> Any:
    """A hashable key of ``v``'s metadata (``TypeError`` for a value that has none: a real tensor, NaN)."""
    if isinstance(v, torch.Tensor):
        if not v.is_meta:
            raise TypeError("not a meta tensor")
        return ("T", tuple(v.shape), v.stride(), v.dtype, v.storage_offset())
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, *(_key(x) for x in v))
    if isinstance(v, float) and v != v:
        raise TypeError("NaN")
    hash(v)
    return (type(v).__name__, v)


def _writes(arg: Any) -> bool:
    return arg.alias_info is not None and arg.alias_info.is_write


_UNCACHED = (torch.Tag.nondeterministic_seeded, torch.Tag.data_dependent_output,
             torch.Tag.dynamic_output_shape)


def _kind(func: Any) -> str | None:
    """``"out"``: a functional op returning new tensors; ``"inplace"``: an in-place pointwise op (returns
    its first argument, metadata unchanged); None: not cached (views, other mutations, random, value-dependent
    outputs)."""
    schema = func._schema
    if any(t in func.tags for t in _UNCACHED):
        return None
    if any(r.alias_info is not None for r in schema.returns):
        pointwise = torch.Tag.pointwise in func.tags and len(schema.returns) == 1
        only_self = bool(schema.arguments) and _writes(schema.arguments[0]) \
            and not any(_writes(a) for a in schema.arguments[1:])
        return "inplace" if pointwise and only_self else None
    return None if any(_writes(a) for a in schema.arguments) else "out"


class MetaCache(TorchDispatchMode):
    """Meta kernels memoised by the metadata of their arguments (module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _KINDS.get(func, "?")
        if kind == "?":
            kind = _KINDS[func] = _kind(func) if isinstance(func, torch._ops.OpOverload) else None
        try:
            key = (func, _key(args), _key(tuple(sorted(kwargs.items())))) if kind is not None else None
        except TypeError:
            key = None
        hit = _ENTRIES.get(key) if key is not None else None
        if hit is not None:
            if kind == "inplace":
                return args[0]
            many, metas = hit
            outs = tuple(torch.empty_strided(s, st, dtype=dt, device=_META) for s, st, dt in metas)
            return outs if many else outs[0]
        out = func(*args, **kwargs)
        if key is not None:
            self._record(key, out)
        return out

    def _record(self, key: tuple, out: Any) -> None:
        flat = out if isinstance(out, (tuple, list)) else (out,)
        if all(isinstance(t, torch.Tensor) and t.is_meta and t.storage_offset() == 0 for t in flat):
            if len(_ENTRIES) >= _LIMIT:
                _ENTRIES.clear()
            metas = tuple((tuple(t.shape), t.stride(), t.dtype) for t in flat)
            _ENTRIES[key] = (isinstance(out, (tuple, list)), metas)


def run_on_meta(gm: GraphModule, flat: list) -> bool:
    """Run ``gm`` (in the caller's no-grad / eval state) on meta versions of the placeholder values ``flat``,
    recording every node's output in ``meta['val']``; False when some node cannot run on meta tensors."""
    try:
        with torch.no_grad(), MetaCache():
            _MetaRecorder(gm).run(*[to_meta(v) for v in flat], enable_io_processing=False)
    except Exception:  # noqa: BLE001 - the fake-tensor check runs instead and gives the verdict
        return False
    return True
