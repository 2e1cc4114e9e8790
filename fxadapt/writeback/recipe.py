"""Recipes: the architecture change ``transform`` made, as plain data that replays on a fresh instance.

A recipe is an ordered list of operations on a module tree, each a JSON-able dict:

- ``{"op": "resize", "name": fqn, "shape": [...]}``: the parameter or buffer ``fqn`` becomes an
  uninitialised tensor of ``shape`` (same dtype, device and ``requires_grad``; every alias of a tied
  tensor gets the same new tensor, so ties survive);
- ``{"op": "set", "module": path, "attr": a, "value": v}``: a size attribute the module derives from its
  shapes (``in_features``, ``num_heads``, ``head_dim``, ``layer_idx``...), tuples kept as tuples;
- ``{"op": "delete", "module": path}``: a container element (a whole residual layer) is removed;
- ``{"op": "insert", "module": path, "after": path}``: a copy of the element ``after`` (already re-widthed)
  is inserted right after it under the new name ``path`` (its weights come from the checkpoint, or from
  ``transform``: a copy whose branch output is zeroed);
- ``{"op": "zero", "module": path, "like": k}``: the module is replaced by ``ZeroBranch``, which returns
  zeros shaped like its ``k``-th tensor input (a removed residual branch: ``y = x + 0``);
- ``{"op": "config", "field": f, "value": v}``: a Hugging Face config field (``hidden_size``...);
- ``{"op": "module_config", "module": path, "field": f, "value": v}``: the module's own view of the config it
  shares with every layer (``ConfigView``) reads ``f`` as ``v``: a module that reads a size from that config
  at run time (Phi-3 splits its fused ``qkv`` at ``config.num_attention_heads * head_dim``) when its layer got
  other widths than the config can state for all of them.

Widths come first (``resize``/``set`` name the original tree), depth after (``delete``/``insert``/``zero``),
then attributes that follow the new depth (``layer_idx``), config fields and per-module config views, as
``transform`` applies them.

Example:
    >>> import torch
    >>> r = Recipe((dict(op="resize", name="0.weight", shape=[5, 3]),
    ...             dict(op="resize", name="0.bias", shape=[5]),
    ...             dict(op="set", module="0", attr="out_features", value=5)))
    >>> m = apply(r, torch.nn.Sequential(torch.nn.Linear(3, 8)))
    >>> m[0].weight.shape, m[0].out_features, m(torch.ones(2, 3)).shape
    (torch.Size([5, 3]), 5, torch.Size([2, 5]))
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxadapt.errors import (
    RecipeError,  # noqa: F401  (defined in fxadapt.errors)
)

DEPTH_OPS = ("delete", "insert", "zero")


@dataclass(frozen=True)
class Recipe:
    """An ordered tuple of recipe operations (see module docstring)."""

    ops: tuple = ()

    def to_json(self) -> str:
        return json.dumps({"format": "fxadapt-recipe/1", "ops": list(self.ops)})

    @staticmethod
    def from_json(text: str | dict) -> Recipe:
        data = json.loads(text) if isinstance(text, str) else text
        if not isinstance(data, dict) or data.get("format") != "fxadapt-recipe/1":
            raise RecipeError("not an fxadapt recipe (expected a JSON object with format 'fxadapt-recipe/1')")
        return Recipe(tuple(data["ops"]))

    def __add__(self, other: Recipe) -> Recipe:
        return Recipe(self.ops + tuple(other.ops))


class ZeroBranch(nn.Module):
    """A removed residual branch: returns zeros shaped like its ``like``-th tensor input, in the output
    structure the branch had (``structure``: ``"tensor"``, or a tuple pattern of ``"tensor"``/``None``)."""

    def __init__(self, like: int = 0, structure: Any = "tensor"):
        super().__init__()
        self.like, self.structure = like, structure

    def forward(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        z = torch.zeros_like(tensors[self.like])
        if self.structure == "tensor":
            return z
        return tuple(z if s == "tensor" else None for s in self.structure)


class ConfigView:
    """One module's view of a config shared by every layer: the fields in ``overrides`` read as given, every
    other read and every write goes to the shared ``base`` (live: ``_attn_implementation`` set later on the
    model's config is seen here too).

    >>> from types import SimpleNamespace
    >>> base = SimpleNamespace(num_attention_heads=4, hidden_size=64)
    >>> v = ConfigView(base, {"num_attention_heads": 2})
    >>> base.hidden_size = 48
    >>> v.num_attention_heads, v.hidden_size, base.num_attention_heads
    (2, 48, 4)
    """

    def __init__(self, base: Any, overrides: dict | None = None):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", dict(overrides or {}))

    def __getattr__(self, name: str):   # only for names not found on the view itself
        if name.startswith("__") or name in ("_base", "_overrides"):
            raise AttributeError(name)
        base, overrides = self.__dict__["_base"], self.__dict__["_overrides"]
        # GPT-2: num_attention_heads -> n_head
        name = (getattr(base, "attribute_map", None) or {}).get(name, name)
        return overrides[name] if name in overrides else getattr(base, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._overrides:
            self._overrides[name] = value
        else:
            setattr(self._base, name, value)

    def __repr__(self) -> str:
        return f"ConfigView({self._overrides}, base={type(self._base).__name__})"


def phase(op: dict) -> str:
    """``width`` (names of the original tree), ``depth``, or ``final`` (after depth: ``layer_idx``,
    config)."""
    if op["op"] in DEPTH_OPS:
        return "depth"
    return "final" if op["op"] in ("config", "module_config") or op.get("final") else "width"


def apply(recipe: Recipe | str | dict, model: nn.Module,
          phases: tuple = ("width", "depth", "final")) -> nn.Module:
    """Replay ``recipe`` on ``model`` (a fresh instance of the adapted model's class, changed in place and
    returned), then load the adapted weights (``load_state_dict``). ``phases`` selects operations (see
    ``phase``): ``transform`` fills in the weights between the width and the depth operations."""
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_json(recipe)
    names: dict[int, list[str]] = {}   # every name of every tensor, found once (ties: several names)
    for n, t in [*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(t), []).append(n)
    for op in recipe.ops:
        if phase(op) not in phases:
            continue
        if op["op"] == "resize":
            _resize(model, op, names)
        else:
            _APPLY[op["op"]](model, op)
    return model


def _resize(model: nn.Module, op: dict, names: dict) -> None:
    old = _tensor(model, op["name"])
    if list(old.shape) == list(op["shape"]):
        return
    new = torch.empty(op["shape"], dtype=old.dtype, device=old.device)
    value = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    for name in names.get(id(old), [op["name"]]):   # every alias of a tied tensor: the tie survives
        _assign(model, name, value)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    if attr in mod._parameters:
        mod._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    elif attr in mod._buffers:
        mod._buffers[attr] = value.detach() if isinstance(value, nn.Parameter) else value
    else:
        raise RecipeError(f"{type(model).__name__} has no parameter or buffer {name!r}")
    if hasattr(mod, "_init_flat_weights"):   # nn.LSTM/GRU keep a list of their weights
        mod._init_flat_weights()


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        try:
            return model.get_buffer(name)
        except AttributeError as e:
            raise RecipeError(f"{type(model).__name__} has no parameter or buffer {name!r}: the recipe was "
                              f"made for another architecture") from e


def _set(model: nn.Module, op: dict) -> None:
    mod = _module(model, op["module"])
    value = op["value"]
    setattr(mod, op["attr"], tuple(value) if op.get("tuple") else value)


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError as e:
        raise RecipeError(f"{type(model).__name__} has no submodule {path!r}: the recipe was made for "
                          f"another architecture") from e


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, key = path.rpartition(".")
    return _module(model, owner), key


def _delete(model: nn.Module, op: dict) -> None:
    parent, key = _parent(model, op["module"])
    _module(model, op["module"])
    _rebuild(parent, [(k, m) for k, m in parent._modules.items() if k != key])


def _insert(model: nn.Module, op: dict) -> None:
    parent, key = _parent(model, op["module"])
    _, after = _parent(model, op["after"])
    src = _module(model, op["after"])
    items = []
    for k, m in parent._modules.items():
        items.append((k, m))
        if k == after:
            items.append((key, copy.deepcopy(src)))
    _rebuild(parent, items)


def _rebuild(parent: nn.Module, items: list) -> None:
    """Re-key a container's children in order; a ``ModuleList`` is renumbered 0..n-1 (its indexing needs
    it)."""
    parent._modules.clear()
    for i, (k, m) in enumerate(items):
        parent._modules[str(i) if isinstance(parent, nn.ModuleList) else k] = m


def _zero(model: nn.Module, op: dict) -> None:
    parent, key = _parent(model, op["module"])
    structure = op.get("structure", "tensor")
    setattr(parent, key,
            ZeroBranch(op.get("like", 0), tuple(structure) if isinstance(structure, list) else structure))


def _set_config(model: nn.Module, field: str, value: Any) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None and isinstance(value, list) and type(cfg.__dict__.get(field)) is not list:
        cfg.__dict__[field] = list(value)   # a marked size (``writeback.stock``): the layers' values
    elif cfg is not None:
        setattr(cfg, field, value)


def _module_config(model: nn.Module, op: dict) -> None:
    mod = _module(model, op["module"])
    view = getattr(mod, "config", None)
    if view is None:
        raise RecipeError(f"{type(model).__name__}.{op['module']} holds no config: the recipe was made for "
                          f"another architecture")
    if not isinstance(view, ConfigView):
        view = ConfigView(view)
        mod.config = view
    view._overrides[op["field"]] = op["value"]


_APPLY = {"set": _set, "delete": _delete, "insert": _insert, "zero": _zero, "module_config": _module_config,
          "config": lambda m, op: _set_config(m, op["field"], op["value"])}
