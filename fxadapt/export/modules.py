"""Saving and restoring written-back models: the user's own class, its recipe and its weights.

``fxadapt.save(model, path)`` on a model ``transform`` returned in the user's class writes one plain-data
file (``torch.load``'s default ``weights_only=True`` reads it): ``{"format": "fxadapt.module/1", "class":
"pkg.module:Qualname", "recipe": <recipe JSON>, "state_dict": {...}, "report": ...}``. ``fxadapt.load(path,
model=fresh)`` replays the recipe on ``fresh`` (a new instance of that class, as its constructor builds it)
and loads the weights; without ``model`` the class is imported and called with no arguments, and a class
that needs arguments gets a one-line error saying to pass ``model=``.

Hugging Face models: ``model.save_pretrained(dir)`` is the stock method. When the result's sizes are
uniform across layers its ``config.json`` states them and stock ``AutoModel*.from_pretrained(dir)`` rebuilds
it; otherwise the config carries ``fxadapt_recipe`` (base sizes + operations) and ``fxadapt.from_pretrained
(dir)`` builds the stock class from the base sizes, replays the recipe and loads the safetensors weights.

Example:
    >>> import os, tempfile, torch, fxadapt
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> small = fxadapt.transform(m, 0.5, (torch.randn(2, 4),))
    >>> p = os.path.join(tempfile.mkdtemp(), "small.pt"); fxadapt.save(small, p)
    >>> again = fxadapt.load(p, model=torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                                                   torch.nn.Linear(16, 2)))
    >>> x = torch.randn(3, 4); torch.equal(again(x), small(x)), again[0].out_features == small[0].out_features
    (True, True)
"""

from __future__ import annotations

import copy
import importlib
import os
from typing import Any

from torch import nn

from fxadapt.errors import (
    LoadError,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.writeback.follow import checkpoint_shapes, follow, made_by
from fxadapt.writeback.recipe import Recipe, apply

FORMAT = "fxadapt.module/1"


def recipe_of(model: nn.Module) -> Recipe:
    """The recipe ``transform`` wrote ``model`` with (raises if it has none)."""
    rec = getattr(model, "fxadapt_recipe", None)
    if not isinstance(rec, Recipe):
        raise LoadError(f"{type(model).__name__} was not returned by fxadapt.transform in its own class "
                        f"(it carries no recipe); fxadapt.save stores such results and GraphModules")
    return rec


def to_dict(model: nn.Module, report: dict | None) -> dict[str, Any]:
    cls = type(model)
    return {"format": FORMAT, "class": f"{cls.__module__}:{cls.__qualname__}",
            "recipe": recipe_of(model).to_json(),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": model.training, "report": report}


def from_dict(data: dict, where: str, model: nn.Module | None) -> nn.Module:
    fresh = model if model is not None else _construct(data["class"], where)
    if model is not None and type(model).__qualname__ != data["class"].partition(":")[2]:
        raise LoadError(f"{where} holds a {data['class']}, not a {type(model).__qualname__}")
    recipe = Recipe.from_json(data["recipe"])
    made = made_by(recipe, fresh)
    recipe = recipe + _followed(fresh, made, {k: tuple(v.shape) for k, v in data["state_dict"].items()})
    missing, unexpected = fresh.load_state_dict(data["state_dict"], strict=False)
    if unexpected or [k for k in missing if k not in data["state_dict"]]:
        raise LoadError(f"{where} does not fit {type(fresh).__qualname__} after its recipe: missing "
                        f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]} (pass a fresh instance "
                        f"built as the original was)")
    object.__setattr__(fresh, "fxadapt_recipe", recipe)
    return fresh.train(bool(data.get("training", False)))


def _config(path: str | os.PathLike):
    """The saved config, and its marked size fields (``fxadapt.writeback.stock``: a list of the layers' values
    where an int belongs, which transformers' validation refuses): built with their base values from the
    recipe, the marks returned to be put back once the model is built."""
    import transformers  # deferred: optional dependency, Hugging Face models only

    data, _ = transformers.PretrainedConfig.get_config_dict(path)
    base = (data.get("fxadapt_recipe") or {}).get("base", {})
    marked = {k: data[k] for k, v in base.items() if isinstance(data.get(k), list)
              and not isinstance(v, list)}
    if not marked:
        return transformers.AutoConfig.from_pretrained(path), {}
    cls = transformers.AutoConfig.for_model(data["model_type"]).__class__
    return cls.from_dict({**data, **{k: base[k] for k in marked}}), marked


def _followed(model: nn.Module, made: set[str], saved: dict) -> Recipe:
    """The recipe's shapes brought to the checkpoint's (``fxadapt.writeback.follow``), applied to
    ``model``."""
    extra = follow(model, made, saved)
    apply(extra, model)
    return extra


def _construct(path: str, where: str) -> nn.Module:
    mod, _, qual = path.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
        return obj()
    except Exception as e:  # noqa: BLE001 - a class that needs constructor arguments, or is not importable
        raise LoadError(f"{where} holds a {qual}; pass model=<a fresh {qual} built as the original was> to "
                        f"fxadapt.load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from e


def from_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """A Hugging Face model saved with ``save_pretrained`` from a ``transform`` result: stock
    ``from_pretrained`` when its config states every size, else the recipe replayed on the stock class.

    >>> import tempfile, torch, transformers, fxadapt
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> lm = transformers.LlamaForCausalLM(cfg).eval()
    >>> small = fxadapt.transform(lm, 0.5, {"input_ids": torch.randint(0, 64, (2, 8))})
    >>> d = tempfile.mkdtemp(); small.save_pretrained(d)
    >>> again = fxadapt.from_pretrained(d).eval()
    >>> ids = torch.randint(0, 64, (1, 5)); torch.allclose(again(ids).logits, small(ids).logits, atol=1e-6)
    True
    """
    import transformers  # deferred: optional dependency, Hugging Face models only

    config, marked = _config(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise LoadError(f"{os.fspath(path)}/config.json names no transformers architecture ({arch!r})")
    rec = getattr(config, "fxadapt_recipe", None)
    if not rec:
        return cls.from_pretrained(path, **kwargs)
    recipe = Recipe(tuple(rec["ops"]))
    shapes = Recipe(tuple(op for op in recipe.ops if op["op"] != "config"))   # the config already says them
    saved, followed = checkpoint_shapes(path), []   # the shapes at save time (``follow``)

    class Adapted(cls):   # the stock class, built at the base sizes and reshaped before the weights load
        def __init__(self, cfg, *args, **kw):
            base = copy.deepcopy(cfg)
            for k, v in rec["base"].items():   # None: the base config did not have the field
                setattr(base, k, v) if v is not None else base.__dict__.pop(k, None)
            super().__init__(base, *args, **kw)
            followed[:] = [_followed(self, made_by(shapes, self), saved)]
            # every module holds ``base`` (with what HF set on it: the attention implementation); it now
            # states the saved sizes and carries the recipe
            base.__dict__.update({k: v for k, v in cfg.__dict__.items() if not k.startswith("_")})

    Adapted.__name__, Adapted.__qualname__, Adapted.__module__ = cls.__name__, cls.__qualname__, \
            cls.__module__
    model = Adapted.from_pretrained(path, config=config, **kwargs)   # HF's loader: key conversions, sharding
    model.__class__ = cls   # the subclass adds no state: the result is the stock class
    recipe = recipe + followed[0]
    object.__setattr__(model, "fxadapt_recipe", recipe)
    model.config.__dict__.update(marked)   # the layers' values again, as saved (``writeback.stock``)
    model.config.fxadapt_recipe = {**rec, "ops": list(recipe.ops)}   # re-saving states the shapes it has now
    return model.eval()
