"""Save and load an adapted ``torch.fx.GraphModule`` as plain data that ``torch.load`` reads with its
defaults.

``torch.save(gm)`` pickles the module's classes and its generated Python code, so ``torch.load`` needs
``weights_only=False`` (which runs arbitrary code). ``save`` instead writes one dict of strings, numbers,
lists, dicts and tensors -- everything the ``weights_only=True`` unpickler accepts:

- ``modules``: every submodule's path, class (only ``torch.nn`` classes are accepted) and its plain
  attributes (``in_channels``, ``stride``, ``eps``, ``training``, ...), i.e. its ``__dict__`` minus
  what ``nn.Module.__init__`` creates;
- ``tensors``: every parameter and buffer by owner and name (with ``requires_grad``; tied parameters are
  stored once and re-tied);
- ``graph``: the nodes in order (op, name, target, args, kwargs); a function target is its qualified name
  (``aten.conv2d.default``, ``operator.getitem``) resolved on load from ``torch.ops``, ``torch``,
  ``operator`` or ``math`` only; nodes, dtypes, devices and slices inside arguments are tagged dicts;
- ``codegen``: the pytree input/output specs (``treespec_dumps``), so the loaded module takes and returns
  the same structures; ``report``: the ``fxadapt.report`` of the model, if it has one.

``load`` rebuilds the module tree without calling constructors (``cls.__new__`` + ``nn.Module.__init__``
+ the saved attributes), re-creates the graph and recompiles it: the result is a ``GraphModule`` with the
same parameter names, train/eval flags and outputs, and it trains, evals and saves again. ``torch.load``
of the file (default ``weights_only=True``) returns the dict itself.

Example:
    >>> import os, tempfile, torch, fxadapt
    >>> from fxadapt.examples import example_model, EXAMPLE_INPUT_SHAPE
    >>> x = torch.randn(EXAMPLE_INPUT_SHAPE)
    >>> small = fxadapt.transform(example_model(), 0.5, (x,), output="graph")
    >>> path = os.path.join(tempfile.mkdtemp(), "small.pt")
    >>> save(small, path)
    >>> again = load(path)
    >>> torch.equal(again.eval()(x), small.eval()(x))
    True
    >>> sorted(torch.load(path))[:3]  # plain torch.load, weights_only=True by default
    ['codegen', 'format', 'graph']
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import operator
import os
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from fxadapt.errors import (
    SaveError,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.export import modules
from fxadapt.export.report import Report, attach

FORMAT = "fxadapt.graph_module/1"
_MODULE_PREFIXES = ("torch.nn.",)
_FUNCTION_MODULES = {"operator": operator, "_operator": operator, "math": math}
_PLAIN = (bool, int, float, str, type(None))


def save(model: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``model`` (a ``GraphModule`` of ``torch.nn`` modules) to ``path`` as plain data (see module doc).

    The file is written to ``path + ".tmp"`` and renamed, so a failure never leaves a partial file.

    >>> import tempfile, os, torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Dropout(0.5)))
    >>> p = os.path.join(tempfile.mkdtemp(), "m.pt"); save(gm, p)
    >>> getattr(load(p), "1").p
    0.5
    """
    data = to_dict(model)
    tmp = f"{os.fspath(path)}.tmp"
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise SaveError(f"cannot write {os.fspath(path)!r}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | os.PathLike, map_location: Any = None, model: nn.Module | None = None) -> nn.Module:
    """Read a file written by ``save`` (with ``torch.load``'s default ``weights_only=True``); a model saved in
    its own class is rebuilt on ``model`` (a fresh instance; default: the class called with no arguments).

    >>> import tempfile, os, torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    >>> p = os.path.join(tempfile.mkdtemp(), "m.pt"); save(gm.eval(), p)
    >>> m = load(p); bn = getattr(m, "1")
    >>> m.training, type(bn).__name__, bn.num_batches_tracked.item()
    (False, 'BatchNorm2d', 0)
    """
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as e:
        raise SaveError(f"cannot load {os.fspath(path)!r}: no such file") from e
    except Exception as e:  # noqa: BLE001 - an unreadable or foreign file
        raise SaveError(f"cannot load {os.fspath(path)!r}: {type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''} "
                        f"(was it written by fxadapt.save?)") from e
    return from_dict(data, os.fspath(path), model)


def to_dict(model: fx.GraphModule) -> dict[str, Any]:
    """The plain-data form of ``model`` that ``save`` writes (a model ``transform`` returned in its own class:
    ``fxadapt.export.modules``)."""
    if not isinstance(model, fx.GraphModule) and hasattr(model, "fxadapt_recipe"):
        return modules.to_dict(model, _report(model))
    if not isinstance(model, fx.GraphModule):
        raise SaveError("fxadapt.save stores a torch.fx.GraphModule or a model fxadapt.transform returned "
                        f"in its own class, got {type(model).__name__}; save its state_dict() with "
                        "torch.save instead")
    return {"format": FORMAT, "training": model.training, "modules": _modules(model),
            "tensors": _tensors(model), "graph": [_node(n) for n in model.graph.nodes],
            "codegen": _codegen(model.graph), "report": _report(model)}


def from_dict(data: Any, where: str = "<dict>", model: nn.Module | None = None) -> nn.Module:
    """The model described by ``to_dict``'s output (``model``: a fresh instance for a module file)."""
    if isinstance(data, dict) and data.get("format") == modules.FORMAT:
        out = modules.from_dict(data, where, model)
        if data.get("report") is not None:
            attach(out, Report.from_dict(data["report"]))
        return out
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SaveError(f"{where!r} is not a model saved by fxadapt.save (format {FORMAT}); "
                        f"for a torch.save'd module use torch.load(path, weights_only=False) if you trust it")
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    for entry in data["modules"]:
        _set_module(gm, entry["path"], _module_from(entry, gm))
    _restore_tensors(gm, data["tensors"])
    gm.graph = _graph(data["graph"], data["codegen"])
    gm.recompile()
    gm.train(data["training"])
    for entry in data["modules"]:  # train() above reset every child; restore each module's own flag
        gm.get_submodule(entry["path"]).training = entry["training"]
    if data.get("report") is not None:
        attach(gm, Report.from_dict(data["report"]))
    return gm


# ----------------------------------------------------------------------------------------- modules


def _modules(gm: nn.Module) -> list[dict]:
    base = set(nn.Module().__dict__)
    out: list[dict] = []
    seen: dict = {}
    for path, mod in gm.named_modules(remove_duplicate=False):
        if not path:
            continue
        if id(mod) in seen:
            out.append({"path": path, "alias_of": seen[id(mod)], "training": mod.training})
            continue
        seen[id(mod)] = path
        cls = type(mod)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if not name.startswith(_MODULE_PREFIXES):
            raise SaveError(f"cannot save module {path!r} of class {name}: fxadapt.save stores torch.nn "
                            f"modules only; save the state_dict and rebuild the model instead")
        attrs = {k: v for k, v in mod.__dict__.items() if k not in base}
        for k, v in attrs.items():
            if not _is_plain(v):
                raise SaveError(f"cannot save attribute {path}.{k} of type {type(v).__name__}: "
                                f"fxadapt.save stores numbers, strings, tuples, lists and dicts of them")
        out.append({"path": path, "class": name, "attrs": attrs, "training": mod.training})
    return out


def _is_plain(v: Any) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (tuple, list)):
        return all(_is_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _is_plain(x) for k, x in v.items())
    return False


def _module_from(entry: dict, gm: nn.Module) -> nn.Module:
    if "alias_of" in entry:
        return gm.get_submodule(entry["alias_of"])
    name = entry["class"]
    if not name.startswith(_MODULE_PREFIXES) or "<" in name:
        raise SaveError(f"refusing to load module class {name}: only torch.nn classes are accepted")
    module_name, _, qualname = name.rpartition(".")
    cls = getattr(importlib.import_module(module_name), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SaveError(f"cannot load module class {name}: not found in this torch version")
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    mod.__dict__.update(entry["attrs"])
    mod.training = entry["training"]
    return mod


def _set_module(root: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    (root.get_submodule(parent) if parent else root).add_module(name, mod)


def _tensors(gm: nn.Module) -> list[dict]:
    out: list[dict] = []
    seen: dict = {}
    for path, mod in gm.named_modules(remove_duplicate=True):
        for name, p in mod._parameters.items():
            key = f"{path}.{name}" if path else name
            entry = {"owner": path, "name": name, "kind": "parameter"}
            if p is not None and id(p) in seen:
                entry["tied_to"] = seen[id(p)]
            elif p is not None:
                seen[id(p)] = key
                entry.update(value=p.detach(), requires_grad=p.requires_grad)
            out.append(entry)
        for name, b in mod._buffers.items():
            persistent = name not in mod._non_persistent_buffers_set
            out.append({"owner": path, "name": name, "kind": "buffer", "persistent": persistent,
                        "value": None if b is None else b.detach()})
    return out


def _restore_tensors(gm: nn.Module, entries: list[dict]) -> None:
    params: dict[str, nn.Parameter | None] = {}
    for e in entries:
        mod = gm.get_submodule(e["owner"])
        key = f"{e['owner']}.{e['name']}" if e["owner"] else e["name"]
        if e["kind"] == "buffer":
            mod.register_buffer(e["name"], e["value"], persistent=e["persistent"])
        elif "tied_to" in e:
            mod.register_parameter(e["name"], params[e["tied_to"]])
        else:
            p = None if e.get("value") is None else nn.Parameter(e["value"], requires_grad=e["requires_grad"])
            params[key] = p
            mod.register_parameter(e["name"], p)


# ------------------------------------------------------------------------------------------- graph


def _node(n: fx.Node) -> dict:
    target = n.target if isinstance(n.target, str) else _function_name(n)
    return {"op": n.op, "name": n.name, "target": target, "args": _enc(n.args), "kwargs": _enc(n.kwargs)}


def _function_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{t._schema.name.replace('::', '.')}" + (
            f".{t._overloadname}" if isinstance(t, torch._ops.OpOverload) else "")
    short = getattr(t, "__name__", "")
    for name in (f"{getattr(t, '__module__', None)}.{getattr(t, '__qualname__', '')}", f"torch.{short}",
                 f"torch.nn.functional.{short}"):
        if _resolve(name) is t:
            return name
    raise SaveError(f"cannot save node {n.name!r}: its target {t!r} is not a torch, operator or math "
                    "function")


def _resolve(name: str) -> Any:
    """The function called ``name``, if it is one a graph may call (see ``_callable``); else ``None``."""
    module_name, _, attr = name.rpartition(".")
    if module_name in _FUNCTION_MODULES:
        obj = getattr(_FUNCTION_MODULES[module_name], attr, None)
    elif name.startswith("torch."):
        obj = torch
        for part in name.split(".")[1:]:
            obj = getattr(obj, part, None)
    else:
        return None
    return obj if _callable(obj) else None


_UNSAFE_OPERATORS = {"attrgetter", "itemgetter", "methodcaller", "call"}


def _callable(obj: Any) -> bool:
    """Tensor math only: ATen ops, ``torch``'s C functions and ``torch.functional``, ``torch.nn.functional``,
    ``torch.sym_*``, ``operator`` (no getters/callers) and ``math`` -- nothing that reads files or calls
    back."""
    if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    module, name = getattr(obj, "__module__", None), getattr(obj, "__name__", "")
    if module in ("operator", "_operator", "math"):
        return callable(obj) and name not in _UNSAFE_OPERATORS
    if module in ("torch.functional", "torch.nn.functional") \
            or (module == "torch" and name.startswith("sym_")):
        return callable(obj)
    return type(obj).__name__ == "builtin_function_or_method" and getattr(torch, name, None) is obj


def _enc(v: Any) -> Any:
    if isinstance(v, fx.Node):
        return {"_fx": "node", "name": v.name}
    if isinstance(v, (tuple, list)):
        seq = [_enc(x) for x in v]
        return seq if isinstance(v, list) else tuple(seq)
    if isinstance(v, dict):
        return {k: _enc(x) for k, x in v.items()}
    if isinstance(v, slice):
        return {"_fx": "slice", "args": _enc((v.start, v.stop, v.step))}
    if isinstance(v, (torch.dtype, torch.memory_format, torch.layout)):
        return {"_fx": type(v).__name__, "name": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"_fx": "device", "name": str(v)}
    if isinstance(v, _PLAIN + (torch.Tensor,)):
        return v
    raise SaveError(f"cannot save graph argument {v!r} of type {type(v).__name__}")


def _dec(v: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(v, dict) and "_fx" in v:
        kind = v["_fx"]
        if kind == "node":
            return env[v["name"]]
        if kind == "slice":
            return slice(*_dec(v["args"], env))
        if kind == "device":
            return torch.device(v["name"])
        value = getattr(torch, v["name"], None)
        if type(value).__name__ != kind:
            raise SaveError(f"cannot load graph argument {v}: unknown in this torch version")
        return value
    if isinstance(v, (tuple, list)):
        seq = [_dec(x, env) for x in v]
        return seq if isinstance(v, list) else tuple(seq)
    if isinstance(v, dict):
        return {k: _dec(x, env) for k, x in v.items()}
    return v


def _graph(nodes: list[dict], codegen: dict | None) -> fx.Graph:
    graph, env = fx.Graph(), dict[str, fx.Node]()
    for d in nodes:
        target = d["target"]
        if d["op"] == "call_function":
            target = _resolve(target)
            if not callable(target):
                raise SaveError(f"cannot load node {d['name']!r}: unknown function {d['target']!r}")
        elif d["op"] == "call_method" and target.startswith("_"):
            raise SaveError(f"cannot load node {d['name']!r}: refusing private method {target!r}")
        node = graph.create_node(d["op"], target, _dec(d["args"], env), _dec(d["kwargs"], env),
                                 name=d["name"])
        env[d["name"]] = node
    if codegen is not None:
        info = fx.graph._PyTreeInfo(codegen["orig_args"], pytree.treespec_loads(codegen["in_spec"]),
                                    pytree.treespec_loads(codegen["out_spec"]))
        graph._codegen = fx.graph._PyTreeCodeGen(info)
    return graph


def _codegen(graph: fx.Graph) -> dict | None:
    info = getattr(graph._codegen, "pytree_info", None)
    if info is None:
        return None
    try:
        return {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
                "out_spec": pytree.treespec_dumps(info.out_spec)}
    except Exception as e:  # noqa: BLE001 - a pytree node type without a serialized name
        raise SaveError(f"cannot save the model's input/output structure: {e}") from e


def _report(gm: nn.Module) -> dict | None:
    rep = getattr(gm, "fxadapt_report", None)
    if rep is None or not dataclasses.is_dataclass(rep) or isinstance(rep, type):
        return None
    return rep.to_dict()
