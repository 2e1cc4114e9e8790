"""Derived attributes: a module's size attributes from the config fields its constructor computes them from.

A module built as ``cls(config[, layer_idx])`` (a Hugging Face layer) is built once more on the meta device
from a copy of the config whose int fields are ``sized.Sized`` ints named by the field: every int attribute
of the new module and of its children is then a polynomial in the fields (a gated delta-net's ``key_dim =
linear_key_head_dim * linear_num_key_heads``, ``conv_dim = 2 * key_dim + value_dim``, its ``conv1d``'s
``in_channels = conv_dim``, ``kernel_size = (linear_conv_kernel_dim,)``). When the rebuilt values equal the
module's own, the new sizes give equations for the fields:

    child attribute   poly(fields) = its written-back value (the graph twin's, or unchanged)
    used attribute    poly(fields) = the value the forward's size arguments require (``uses``)

solved by ``sized.solve``; every attribute of the module whose fields are all determined takes its
polynomial's value, and one computed from no field at all (a constant) keeps its value. So an attribute
changes because what it is computed from changed, never because its value equals a changed size (a
kernel size of 4 beside 4 value heads pruned to 2 stays 4). Where no rebuild matches, the used attributes
alone take their required values.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch
from torch import nn

from fxadapt.writeback.sized import Sized, evaluate, poly_of, solve


def _ints(v) -> bool:
    return type(v) is int or isinstance(v, Sized)


def _size_attrs(mod: nn.Module) -> dict[tuple[str, str], object]:
    """``(child path, attr) -> value``: every int (or tuple of ints) attribute of ``mod`` and its children."""
    out = {}
    for rel, sub in mod.named_modules():
        for k, v in vars(sub).items():
            if k.startswith("_") or k == "training":
                continue
            if _ints(v) or (isinstance(v, tuple) and v and all(_ints(x) for x in v)):
                out[(rel, k)] = v
    return out


def _as_int(v):
    return tuple(int(x) for x in v) if isinstance(v, tuple) else int(v)


def _configs(cfg) -> list:
    """The model's config and its sub-configs (a layer of a composite model takes its text config)."""
    if cfg is None or not hasattr(cfg, "to_dict"):
        return []
    return [cfg, *(v for v in vars(cfg).values() if hasattr(v, "to_dict") and v is not cfg)]


def _tagged(cfg):
    new = copy.copy(cfg)
    for k, v in vars(cfg).items():
        if type(v) is int:
            new.__dict__[k] = Sized(v, {(k,): 1})
    return new


def rebuilt(mod: nn.Module, cfg) -> dict[tuple[str, str], object] | None:
    """``_size_attrs`` of ``mod`` rebuilt from a tagged copy of ``cfg`` (or a sub-config), when the rebuild
    has exactly ``mod``'s attributes and values; None otherwise."""
    try:
        params = list(inspect.signature(type(mod).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if params and params[0].name != "config" and params[0].kind is not params[0].VAR_POSITIONAL:
        return None     # not built from a config (a wrapped constructor takes ``*args``: tried as one)
    idx = mod.__dict__.get("layer_idx")
    calls = [((), {"layer_idx": idx}), ((idx,), {})] if type(idx) is int else []
    want = {k: _as_int(v) for k, v in _size_attrs(mod).items()}
    for c in _configs(cfg):
        for args, kwargs in [*calls, ((), {})]:
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    new = type(mod)(_tagged(c), *args, **kwargs)
            except Exception:  # noqa: BLE001 - a constructor that does not take this config or call
                continue
            got = _size_attrs(new)
            if {k: _as_int(v) for k, v in got.items()} == want:
                return got
    return None


def _entries(v) -> tuple:
    return v if isinstance(v, tuple) else (v,)


def _equations(path: str, mod: nn.Module, polys: dict, attrs: dict, used: dict) -> list:
    eqs = []
    for (rel, attr), p in polys.items():
        if rel:
            full = f"{path}.{rel}" if path else rel
            target = attrs.get((full, attr), mod.get_submodule(rel).__dict__[attr])
        elif attr in used:
            target = used[attr]
        else:
            continue
        for x, t in zip(_entries(p), _entries(target)):
            eqs.append((poly_of(x), int(t)))
    return eqs


def _decided(path: str, mod: nn.Module, polys: dict | None, attrs: dict,
             own: dict[str, int]) -> tuple[dict, dict]:
    """``(attr -> value, field -> new value)``: the module's own attributes the solved config fields
    determine, and those fields (the used attributes alone, and no fields, where no rebuild matches or its
    equations contradict each other)."""
    fields = solve(_equations(path, mod, polys, attrs, own), {}) if polys is not None else None
    if polys is None or fields is None:
        return dict(own), {}
    decided: dict[str, object] = {}
    for (rel, attr), p in polys.items():
        vals = [evaluate(poly_of(x), fields) for x in _entries(p)]
        if not rel and all(v is not None for v in vals):
            decided[attr] = tuple(vals) if isinstance(p, tuple) else vals[0]
    return decided, fields


def derived_attrs(model: nn.Module, attrs: dict, used: dict[str, dict[str, int]]) -> tuple[dict, dict]:
    """``attrs`` (``(path, attr) -> new value``, from ``widths``) with the attributes of the modules in
    ``used`` (``uses.forward_uses``) decided by what computes them (see the module docstring), and per
    module path the config fields it was rebuilt from whose solved value differs: ``{field: (old, new)}``."""
    out, fields = dict(attrs), {}
    cfg = getattr(model, "config", None)
    for path, own in used.items():
        mod = model.get_submodule(path)
        polys = rebuilt(mod, cfg)
        decided, solved = _decided(path, mod, polys, attrs, own)
        olds = {n: int(x) for p in (polys or {}).values() for x in _entries(p) if isinstance(x, Sized)
                for m in x.poly for n in m if len(x.poly) == 1 and m == (n,) and x.poly[m] == 1}
        fields[path] = {f: (olds[f], v) for f, v in solved.items() if f in olds and olds[f] != v}
        for attr, v in decided.items():
            if v == mod.__dict__.get(attr):
                out.pop((path, attr), None)
            else:
                out[(path, attr)] = v
    return out, {p: f for p, f in fields.items() if f}
