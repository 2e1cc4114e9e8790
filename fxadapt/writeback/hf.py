"""Hugging Face configs of written-back models: the new sizes field by field, ``layer_idx``/``layer_types``
after depth changes, and whether the stock class can rebuild the result from its config alone.

Fields, set only where the config has them and their old value is the old size (so a field means what we
think it means): hidden (``hidden_size``/``n_embd``/``d_model``: the input embedding's width), heads,
key/value heads and ``head_dim`` (from the attention modules' written-back attributes, when every layer
agrees), intermediate (``intermediate_size``/``n_inner``/``d_ff``/``ffn_dim``: the output width of every
layer whose old output width was that size, and the ``intermediate_dim`` of mixture-of-experts modules,
when they agree) and layers (``num_hidden_layers``/``n_layer``/
``num_layers``: the length of the layer list) and experts (``num_local_experts``/``num_experts``: the
expert modules' count, ``fxadapt.writeback.experts``). ``head_dim`` is set explicitly where the new head size is no
longer ``hidden / heads`` and the config has the field (Llama-style configs store it). A field the config
class derives as a read-only property (Falcon's ``head_dim``) is never set.

*Uniform*: a fresh ``type(model)(config)`` on the meta device has exactly the written-back state-dict
shapes; then stock ``save_pretrained``/``from_pretrained`` round-trip. Otherwise the config keeps what it
can say and carries the recipe (``config.fxadapt_recipe``: the base sizes and the operations), which
``fxadapt.from_pretrained`` replays on a fresh instance of the stock class before loading the weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fxadapt.writeback.experts import EXPERT_FIELDS, expert_count

FIELDS = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "decoder_attention_heads"),
    "kv": ("num_key_value_heads",),
    "head_dim": ("head_dim", "d_kv"),
    "intermediate": ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "experts": EXPERT_FIELDS,
}
RECIPE_FIELD = "fxadapt_recipe"


def is_hf(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "to_dict") and hasattr(model, "save_pretrained")


def _raw(cfg, name: str):
    """A config field without its ``attribute_map`` alias (GPT-2's ``hidden_size`` is ``n_embd``)."""
    return cfg.__dict__.get(name, None)


def config_ops(model: nn.Module, original: nn.Module, order: dict, attention: dict) -> list[dict]:
    """``config`` operations (and ``layer_idx``/``layer_types`` ``set`` operations) for a written-back HF
    ``model`` (``original``: the unchanged model; ``order``: container -> original index per element;
    ``attention``: module path -> {kind: (old, new)} evidence)."""
    cfg = model.config
    new = {}
    emb_new, emb_old = _emb(model), _emb(original)
    if emb_new and emb_old:
        new["hidden"] = (emb_old, emb_new)
    if (experts := expert_count(model, original)) is not None:
        new["experts"] = experts
    for kind in ("heads", "kv", "head_dim"):
        vals = {pairs[kind] for pairs in attention.values() if kind in pairs}
        if len(vals) == 1:
            new[kind] = next(iter(vals))
    ops = []
    for parent, seq in order.items():
        n_old = len(original.get_submodule(parent)) if parent else len(original)
        new.setdefault("layers", (n_old, len(seq)))
        types = _raw(cfg, "layer_types")
        if isinstance(types, list) and len(types) == n_old:
            ops.append({"op": "config", "field": "layer_types", "value": [types[i] for i in seq]})
        ops += _layer_idx(model, parent)
    for kind, (old, value) in new.items():
        for name in FIELDS[kind]:
            if _raw(cfg, name) == old and old != value:
                ops.append({"op": "config", "field": name, "value": value})
    ops += _intermediate(model, original, cfg)
    ops += _explicit_head_dim(cfg, new)
    return [o for o in ops if o["op"] != "config" or settable(cfg, o["field"])]


def settable(cfg, name: str) -> bool:
    """Whether ``cfg.name`` can be assigned: a read-only property (Falcon's ``head_dim``, derived as
    ``hidden_size // num_attention_heads``) cannot state a size; the recipe carries it instead.

    >>> class Cfg:
    ...     @property
    ...     def head_dim(self):
    ...         return 16
    >>> settable(Cfg(), "head_dim"), settable(Cfg(), "hidden_size")
    (False, True)
    """
    attr = getattr(type(cfg), name, None)
    return not isinstance(attr, property) or attr.fset is not None


def _explicit_head_dim(cfg, new: dict) -> list[dict]:
    """A config that derives ``head_dim`` as ``hidden / heads`` (Qwen2) gets it explicitly once the hidden
    size changed without the head size (its attention and rotary modules read ``config.head_dim`` first)."""
    heads_old = getattr(cfg, "num_attention_heads", None)
    if "hidden" not in new or _raw(cfg, "head_dim") is not None or type(heads_old) is not int or not heads_old:
        return []
    hidden_old, hidden_new = new["hidden"]
    hd = new.get("head_dim", (None, hidden_old // heads_old))[1]
    heads = new.get("heads", (None, heads_old))[1]
    return [] if hidden_new == hd * heads else [{"op": "config", "field": "head_dim", "value": hd}]


def _emb(model: nn.Module) -> int | None:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    w = getattr(emb, "weight", None)
    return int(w.shape[-1]) if isinstance(w, torch.Tensor) else None


def _layer_idx(model: nn.Module, parent: str) -> list[dict]:
    ops = []
    container = model.get_submodule(parent) if parent else model
    for j, (key, layer) in enumerate(container._modules.items()):
        for path, mod in layer.named_modules():
            if type(getattr(mod, "layer_idx", None)) is int and mod.layer_idx != j:
                full = ".".join(p for p in (parent, key, path) if p)
                ops.append({"op": "set", "module": full, "attr": "layer_idx", "value": j, "final": True})
    return ops


def _intermediate(model: nn.Module, original: nn.Module, cfg) -> list[dict]:
    ops = []
    olds = {n: p.shape for n, p in original.named_parameters()}
    for name in FIELDS["intermediate"]:
        old = _raw(cfg, name)
        if type(old) is not int:
            continue
        vals = set()
        for n, p in model.named_parameters():
            if n.endswith("weight") and n in olds and len(olds[n]) == 2 and olds[n][0] == old != olds[n][1]:
                vals.add(int(p.shape[0]))
        vals |= _expert_widths(model, original, old)
        if len(vals) == 1 and old not in vals:
            ops.append({"op": "config", "field": name, "value": vals.pop()})
    return ops


EXPERT_WIDTH_ATTRS = ("intermediate_dim",)
"""The intermediate width of a mixture-of-experts module holding 3-D expert weights (transformers'
``MixtralExperts``-style ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``), as written back."""


def _expert_widths(model: nn.Module, original: nn.Module, old: int) -> set[int]:
    """New intermediate widths of the expert modules whose old one was ``old``."""
    new = dict(model.named_modules())
    return {getattr(new[path], attr) for path, mod in original.named_modules() if path in new
            for attr in EXPERT_WIDTH_ATTRS if getattr(mod, attr, None) == old}


def keep_valid(cfg, original_cfg, ops: list[dict]) -> list[str]:
    """Config fields that transformers' own validation refuses (``save_pretrained`` refuses e.g. a hidden size
    that is not a multiple of the heads even with an explicit ``head_dim``) keep their old value; the recipe
    has them. The fields are set again one at a time, in order, each kept only if the config stays valid.
    Returns the fields left at their old values."""
    fields = [o for o in ops if o["op"] == "config"]
    if _valid(cfg):
        return []
    for op in fields:
        setattr(cfg, op["field"], copy.deepcopy(getattr(original_cfg, op["field"], None)))
    undone = []
    for op in fields:
        old = getattr(cfg, op["field"], None)
        setattr(cfg, op["field"], copy.deepcopy(op["value"]))
        if not _valid(cfg):
            setattr(cfg, op["field"], old)
            undone.append(op["field"])
    heads = {*FIELDS["heads"], *FIELDS["kv"]}
    if heads & set(undone):   # head counts go together: none of them, if one cannot be stated
        for op in fields:
            if op["field"] in heads and op["field"] not in undone:
                setattr(cfg, op["field"], copy.deepcopy(getattr(original_cfg, op["field"], None)))
                undone.append(op["field"])
    return undone


def _valid(cfg) -> bool:
    check = getattr(cfg, "validate", None)
    try:
        if check is not None:
            check()
        return True
    except Exception:  # noqa: BLE001 - any validator's complaint
        return False


def stock_rebuilds(model: nn.Module) -> bool:
    """Whether ``type(model)(model.config)`` has exactly ``model``'s state-dict names and shapes."""
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception:  # noqa: BLE001 - a config the class cannot build from is not uniform
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return mine == theirs


def base_values(original: nn.Module, ops: list[dict]) -> dict[str, Any]:
    """The original values of the config fields ``ops`` change."""
    return {o["field"]: copy.deepcopy(getattr(original.config, o["field"], None)) for o in ops if o["op"] == "config"}
