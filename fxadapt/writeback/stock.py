"""Configs that stock loaders read right or refuse: never a ``config.json`` that the stock class builds
differently from the model it was saved with.

The check (family-independent): ``type(model)(deepcopy(model.config))`` built on the meta device, every
state-dict name and shape and every module's head-size attributes and float constants (the same shapes
can split into other heads; Gemma derives its embedding scale from the hidden size) compared with the
model's:

    verdict(model) = "rebuilds"  every name and shape equal: stock ``from_pretrained`` / ``from_config`` work
                     "refuses"   the class (or the config's own validation) raises: stock loaders fail loudly
                     "differs"   it builds, with other shapes: a stock loader would *silently* misread it

Where the config cannot state the result (per-layer widths; a field transformers' validation refuses,
``hf.keep_valid``), the config carries ``fxadapt_recipe`` and every size field that does not describe the
model is *marked*: written as the list of the layers' values (``intermediate_size: [224, 176]``, in layer
order; a refused field as ``[value]``). The strict config dataclasses of transformers refuse a list where
an int belongs (``AutoConfig.from_pretrained``: "Validation error for field 'intermediate_size': expected
int, got list"), and a module built from it fails on the list, so no stock loader builds a model that is
neither the original nor the result. ``fxadapt.from_pretrained`` reads the marked fields' base values from
the recipe and replays it. A mark the config's own validation cannot read (``save_pretrained`` validates:
Llama computes ``hidden % heads``), or that breaks the model at the example inputs (plain and with
``use_cache=True``: RWKV reads ``config.hidden_size`` at run time), is not made; while the stock class
still builds another model, the hidden size, then the intermediate size, then (the last resort, for
configs whose sizes fxadapt does not know: ResNet's ``embedding_size``) another int field named like a
size is marked as ``[value]``. Where no mark can be made the verdict stays ``"differs"``: stock
``from_pretrained`` still fails loudly on the weights' shapes unless they coincide.

Example:
    >>> import transformers
    >>> cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    >>> m = transformers.GPT2LMHeadModel(cfg)
    >>> verdict(m)
    'rebuilds'
    >>> m.config.n_inner = 100      # says 100, the MLPs are 128 wide
    >>> verdict(m)
    'differs'
    >>> mark(m.config, "n_inner", [128, 96]); verdict(m)
    'refuses'
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from fxadapt.ir.capture import as_called
from fxadapt.writeback.hf import FIELDS, intermediate_widths, layer_of, valid
from fxadapt.writeback.widths import NAMES


def verdict(model: nn.Module) -> str:
    """``"rebuilds"``, ``"refuses"`` or ``"differs"`` (module docstring)."""
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception:  # noqa: BLE001 - any refusal of the class or the config's validation is loud
        return "refuses"
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return "rebuilds" if mine == theirs and _sizes(model) == _sizes(fresh) else "differs"


def _sizes(model: nn.Module) -> dict[tuple[str, str], int | float]:
    """Every module's attention size attributes (``widths.NAMES``) and plain float attributes: the same
    shapes can hide another split into heads (GPT-Neo: 3 heads of 16 on 48, or the stock 4 of 12) or a
    constant the class derives from the config (Gemma's ``scalar_embed_scale = sqrt(hidden_size)``, which the
    adapted model keeps at the original's). Other ints are left out: sizes modules only record
    (``LlamaMLP.intermediate_size``, ``in_features``) are not refreshed by the write-back and compute
    nothing."""
    names = {n for kind in ("heads", "kv", "head_dim", "groups") for n in NAMES[kind]}
    return {(path, k): v for path, mod in model.named_modules() for k, v in vars(mod).items()
            if (type(v) is float or (type(v) is int and k in names)) and not k.startswith("_")}


def mark(cfg, field: str, values: list) -> None:
    """State ``field`` as a list of layer values (bypassing the strict dataclass' check on assignment)."""
    cfg.__dict__[field] = list(values)


def marks(work: nn.Module, original: nn.Module, config_ops: list[dict], evidence: dict) -> list[dict]:
    """``config`` operations (list values) marking every size field of ``work.config`` that does not
    describe ``work`` (``original``: the unchanged model; ``config_ops``: the config operations made;
    ``evidence``: attention module path -> {kind: (old, new)})."""
    cfg, base = work.config, original.config
    out: dict[str, list] = {}
    for op in config_ops:   # a field the config's validation refused keeps its old value (hf.keep_valid)
        if op["op"] == "config" and op["field"] in _size_fields() \
                and cfg.__dict__.get(op["field"]) != op["value"]:
            out[op["field"]] = [op["value"]]
    for name, (_, per_layer) in intermediate_widths(work, original).items():
        if len(set(per_layer)) > 1:
            out[name] = per_layer
    for kind in ("heads", "kv", "head_dim"):
        per_layer: dict[str, int] = {}
        for path, pairs in evidence.items():
            if kind in pairs:
                per_layer.setdefault(layer_of(path), pairs[kind][1])
        old = {pairs[kind][0] for pairs in evidence.values() if kind in pairs}
        if len(set(per_layer.values())) > 1 and len(old) == 1:
            for name in FIELDS[kind]:
                if base.__dict__.get(name) == next(iter(old)):
                    out[name] = list(per_layer.values())
    return [{"op": "config", "field": f, "value": v} for f, v in out.items()]


def runner(model: nn.Module, inputs) -> Callable[[], bool]:
    """Whether ``model`` still runs at the example ``inputs`` (and with ``use_cache=True`` where its call
    takes it: ``generate``'s path) once a field is marked: a model that reads a size from its config at run
    time (RWKV allocates its state with ``config.hidden_size``) must not find a list there."""

    def runs() -> bool:
        plain = as_called(model, inputs)
        calls = [plain]
        if "use_cache" in plain.kwargs:
            calls.append(dataclasses.replace(plain, kwargs={**plain.kwargs, "use_cache": True}))
        try:
            with torch.no_grad():
                for c in calls:
                    c.call(model)
        except Exception:  # noqa: BLE001 - any failure: the mark is read at run time
            return False
        return True

    return runs


def refuse_misreads(work: nn.Module, original: nn.Module, config_ops: list[dict], evidence: dict,
                    runs: Callable[[], bool] = lambda: True) -> list[dict]:
    """Mark ``work.config`` (in place) so that stock loaders rebuild ``work`` or refuse it; the marking
    ``config`` operations (for the recipe). A model the stock class rebuilds gets none. A mark the config's
    own validation cannot read (``save_pretrained`` runs it: Llama computes ``hidden % heads``), or that the
    model reads at run time (``runs`` fails: RWKV's cached state is ``config.hidden_size`` wide), is not
    made; while the stock class still builds another model, the hidden, then the intermediate sizes, then
    other int fields named like a size are marked as ``[value]``."""
    if verdict(work) == "rebuilds":
        return []
    cfg = work.config
    ops = [op for op in marks(work, original, config_ops, evidence)
           if _marked(cfg, op["field"], op["value"], runs)]
    aliases = getattr(cfg, "attribute_map", None) or {}   # DistilBERT: hidden_size -> dim
    fallback = [aliases.get(f, f) for kind in ("hidden", "intermediate") for f in FIELDS[kind]]
    fallback = [f for f in dict.fromkeys(fallback) if type(cfg.__dict__.get(f)) is int]
    fallback += [f for f in _int_sizes(cfg) if f not in fallback][:LAST_RESORT]
    while fallback and verdict(work) == "differs":
        name = fallback.pop(0)
        value = cfg.__dict__[name]
        if _marked(cfg, name, [value], runs):
            ops.append({"op": "config", "field": name, "value": [value]})
    return ops


LAST_RESORT = 8
_SIZE_WORDS = ("size", "dim", "channels", "embed", "width", "hidden")


def _int_sizes(cfg) -> list[str]:
    """The config's other int fields named like a size (ResNet's ``embedding_size``): a config whose sizes
    fxadapt does not know (``hf.FIELDS``) is marked there, as the last resort, so it is refused, not
    misread."""
    return [k for k, v in vars(cfg).items() if type(v) is int and v > 1 and not k.startswith("_")
            and any(w in k for w in _SIZE_WORDS) and "vocab" not in k and "position" not in k]


def _marked(cfg, field: str, values: list, runs: Callable[[], bool]) -> bool:
    """Mark ``field`` where the config's validation still passes and the model still runs (else leave it);
    whether it was marked."""
    old = cfg.__dict__.get(field)
    mark(cfg, field, values)
    if valid(cfg) and runs():
        return True
    cfg.__dict__[field] = old
    return False


def _size_fields() -> set[str]:
    return {f for kind in ("hidden", "heads", "kv", "head_dim", "intermediate") for f in FIELDS[kind]}
