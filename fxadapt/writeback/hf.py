"""Hugging Face configs of written-back models: the new sizes field by field, ``layer_idx``/``layer_types``
after depth changes, and whether the stock class can rebuild the result from its config alone.

Fields, set only where the config has them and their old value is the old size (so a field means what we
think it means): hidden (``hidden_size``/``n_embd``/``d_model``: the input embedding's width), heads,
key/value heads and ``head_dim`` (from the attention modules' written-back attributes, when every layer
agrees), intermediate (``intermediate_size``/``n_inner``/``d_ff``/``ffn_dim``: the output width of every
layer whose old output width was that size, and the ``intermediate_dim`` of mixture-of-experts modules,
when they agree), the fields modules were rebuilt from (``derive``, when they agree) and layers
(``num_hidden_layers``/``n_layer``/``num_layers``: the length of the layer list) and experts
(``num_local_experts``/``num_experts``: the expert modules' count, ``fxadapt.writeback.experts``).
``head_dim`` is set explicitly where the new head size is no longer ``hidden / heads`` and the config has
the field (Llama-style configs store it). A field the config class derives as a read-only property
(Falcon's ``head_dim``) is never set.

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
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
              "decoder_attention_heads"),
    "kv": ("num_key_value_heads",),
    "head_dim": ("head_dim", "d_kv"),
    "intermediate": ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim",
                     "hidden_dim"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "experts": EXPERT_FIELDS,
}
RECIPE_FIELD = "fxadapt_recipe"


def is_hf(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "to_dict") and hasattr(model, "save_pretrained")


def raw(cfg, name: str):
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
        vals = {pairs[kind] for pairs in attention.values() if kind in pairs} \
                or _attr_pairs(model, original, kind)
        if len(vals) == 1:
            new[kind] = next(iter(vals))
    ops = []
    for parent, seq in order.items():
        n_old = len(original.get_submodule(parent)) if parent else len(original)
        new.setdefault("layers", (n_old, len(seq)))
        types = raw(cfg, "layer_types")
        if isinstance(types, list) and len(types) == n_old:
            ops.append({"op": "config", "field": "layer_types", "value": [types[i] for i in seq]})
        ops += _layer_idx(model, parent)
    for kind, (old, value) in new.items():
        for name in FIELDS[kind]:
            if raw(cfg, name) == old and old != value:
                ops.append({"op": "config", "field": name, "value": value})
    ops += _intermediate(model, original, cfg)
    ops += _explicit_head_dim(cfg, new)
    ops += size_lists(model, cfg, attention)
    ops += rebuilt_fields(cfg, attention, {o["field"] for o in ops if o["op"] == "config"})
    return [o for o in ops if o["op"] != "config" or (settable(cfg, o["field"]) and not rescales(cfg, o))]


def rescales(cfg, op: dict) -> bool:
    """Whether setting ``op``'s field changes a float the config derives from it (a ``property``: MiniCPM3's
    ``logits_scaling = hidden_size / dim_model_base``, which its forward divides the hidden states by). The
    graph keeps the original constant, so such a field keeps its old value and the recipe carries the
    size (the stock class then cannot rebuild the result from its config alone).

    >>> class Cfg:
    ...     hidden_size, base = 64, 256
    ...     @property
    ...     def scale(self):
    ...         return self.hidden_size / self.base
    >>> rescales(Cfg(), {"field": "hidden_size", "value": 32})
    True
    >>> rescales(Cfg(), {"field": "base", "value": 256})
    False
    """
    props = [n for n in dir(type(cfg)) if isinstance(getattr(type(cfg), n, None), property)]
    if not props:
        return False
    new = copy.deepcopy(cfg)
    try:
        setattr(new, op["field"], copy.deepcopy(op["value"]))
    except Exception:  # noqa: BLE001 - a field the config refuses is not set here either
        return False
    return any(type(a) is float and a != b for a, b in ((_prop(cfg, n), _prop(new, n)) for n in props))


def _prop(cfg, name: str) -> Any:
    try:
        return getattr(cfg, name)
    except Exception:  # noqa: BLE001 - a property that needs fields this config lacks
        return None


def size_lists(model: nn.Module, cfg, attention: dict) -> list[dict]:
    """Per-stage size lists of the config (``hidden_sizes``, ``embed_dims``: a list of ints named ``*_sizes``/
    ``*_dims``/``dims``) that a module holding the config reads in its own view/split arguments (PVTv2's
    head: ``reshape(b, -1, config.hidden_sizes[-1])``): an entry whose old value such an argument edited to
    one new size (and no argument there kept) takes it.

    >>> from types import SimpleNamespace as NS
    >>> m = nn.Module(); m.config = NS(hidden_sizes=[16, 32, 64], mlp_ratios=[4, 4, 64])
    >>> size_lists(m, m.config, {"": {("view", 64): (64, 32), "hidden": (64, 64)}})
    [{'op': 'config', 'field': 'hidden_sizes', 'value': [16, 32, 32]}]
    """
    edits: dict[int, set] = {}
    kept: set = set()
    for path, mod in model.named_modules():
        if getattr(mod, "config", None) is not cfg:
            continue
        for key, (a, b) in attention.get(path, {}).items():
            if isinstance(key, tuple) and key[0] == "view":
                edits.setdefault(a, set()).add(b)
            elif isinstance(key, tuple) and key[0] == "kept":
                kept.add(a)
    new = {a: next(iter(bs)) for a, bs in edits.items() if len(bs) == 1 and a not in kept}
    ops = []
    for name, value in sorted(vars(cfg).items()):
        if not (name.endswith(("_sizes", "_dims")) or name == "dims") or not isinstance(value, list) \
                or not value or not all(type(v) is int for v in value):
            continue
        out = [new.get(v, v) for v in value]
        if out != value:
            ops.append({"op": "config", "field": name, "value": out})
    return ops


def rebuilt_fields(cfg, evidence: dict, done: set) -> list[dict]:
    """The config fields modules were rebuilt from (``derive``: ``("field", name): (old, new)`` in the
    evidence; a gated delta-net's ``linear_num_value_heads``), where every such module agrees, the config
    holds the old value and no other operation sets the field.

    >>> from types import SimpleNamespace as NS
    >>> ev = {"a": {("field", "n_v"): (4, 2)}, "b": {("field", "n_v"): (4, 2), ("field", "n_k"): (2, 1)},
    ...       "c": {("field", "n_k"): (2, 3)}}
    >>> rebuilt_fields(NS(n_v=4, n_k=2), ev, set())
    [{'op': 'config', 'field': 'n_v', 'value': 2}]
    """
    found: dict[str, set] = {}
    for pairs in evidence.values():
        for key, pair in pairs.items():
            if isinstance(key, tuple) and key[0] == "field":
                found.setdefault(key[1], set()).add(pair)
    return [{"op": "config", "field": f, "value": next(iter(p))[1]} for f, p in sorted(found.items())
            if len(p) == 1 and f not in done and raw(cfg, f) == next(iter(p))[0]]


ATTRS = {"heads": ("num_heads", "num_attention_heads", "n_heads"),
         "kv": ("num_key_value_heads", "num_kv_heads"),
         "head_dim": ("head_dim", "attention_head_size", "head_size")}
"""Attention modules' size attributes, read where the graph gave no attention evidence (GPT-Neo, BioGPT)."""


def _attr_pairs(model: nn.Module, original: nn.Module, kind: str) -> set[tuple[int, int]]:
    """``{(old, new)}`` of the ``kind`` attributes of the modules at the same path in both trees."""
    old = dict(original.named_modules())
    out = set()
    for path, mod in model.named_modules():
        was = old.get(path)
        for attr in ATTRS[kind] if type(was) is type(mod) else ():
            a, b = getattr(was, attr, None), mod.__dict__.get(attr)
            if type(a) is int and type(b) is int and attr in was.__dict__:
                out.add((a, b))
    return out


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
    if "hidden" not in new or raw(cfg, "head_dim") is not None or type(heads_old) is not int or not heads_old:
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
    derived = _emb(model) != _emb(original)   # a None field reads 4 x hidden: state it once hidden moved
    for name, (old, per_layer) in intermediate_widths(model, original).items():
        vals = set(per_layer)
        if len(vals) == 1 and (old not in vals or (derived and raw(cfg, name) is None)):
            ops.append({"op": "config", "field": name, "value": vals.pop()})
    return ops


def intermediate_widths(model: nn.Module, original: nn.Module) -> dict[str, tuple[int, list[int]]]:
    """Intermediate field -> (its old size, the new width of every layer that had it, in order). A field
    the config leaves ``None`` is derived as 4 x hidden (GPT-2's ``n_inner``, GPT-Neo's
    ``intermediate_size``): its old size is 4 x the original embedding width."""
    out, cfg = {}, original.config
    olds = {n: p.shape for n, p in original.named_parameters()}
    for name in FIELDS["intermediate"]:
        old = raw(cfg, name)
        if old is None and name in cfg.__dict__ and _emb(original):
            old = 4 * _emb(original)
        if type(old) is not int:
            continue
        per_layer = _layer_widths(model, olds, old, 1) or _layer_widths(model, olds, old, 0)
        side = name.split("_")[0] if name.startswith(("encoder_", "decoder_")) else None   # BART's two fields
        if side:
            per_layer = {k: v for k, v in per_layer.items() if side in k}
        widths = [*per_layer.values(), *sorted(_expert_widths(model, original, old))]
        if widths:
            out[name] = (old, widths)
    return out


def _layer_widths(model: nn.Module, olds: dict, old: int, axis: int) -> dict[str, int]:
    """Layer -> the new size on ``axis`` of its first 2-D weight whose old size was ``old`` on that axis (and
    not on the other). The input axis first (``axis=1``): an MLP's down projection reads the intermediate
    width (Linear ``[H, I]``; GPT-2's Conv1D ``c_fc`` is ``[H, I]``), where a fused gate/up ``[2I, H]`` or
    a qkv projection whose output happens to be ``I`` wide would mislead the output axis."""
    out: dict[str, int] = {}
    for n, p in model.named_parameters():
        o = olds.get(n)
        if n.endswith("weight") and o is not None and len(o) == 2 and o[axis] == old != o[1 - axis]:
            out.setdefault(layer_of(n), int(p.shape[axis]))
    return out


def layer_of(name: str) -> str:
    """The layer a tensor or module name belongs to: the name up to its first container index.

    >>> layer_of("model.layers.3.mlp.up_proj.weight"), layer_of("lm_head.weight")
    ('model.layers.3', 'lm_head.weight')
    """
    parts = name.split(".")
    k = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    return ".".join(parts[:k + 1])


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
    if valid(cfg):
        return []
    for op in fields:
        setattr(cfg, op["field"], copy.deepcopy(getattr(original_cfg, op["field"], None)))
    undone = []
    for op in fields:
        old = getattr(cfg, op["field"], None)
        setattr(cfg, op["field"], copy.deepcopy(op["value"]))
        if not valid(cfg):
            setattr(cfg, op["field"], old)
            undone.append(op["field"])
    heads = {*FIELDS["heads"], *FIELDS["kv"]}
    if heads & set(undone):   # head counts go together: none of them, if one cannot be stated
        for op in fields:
            if op["field"] in heads and op["field"] not in undone:
                setattr(cfg, op["field"], copy.deepcopy(getattr(original_cfg, op["field"], None)))
                undone.append(op["field"])
    return undone


def valid(cfg) -> bool:
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
    return {o["field"]: copy.deepcopy(getattr(original.config, o["field"], None)) for o in ops
            if o["op"] == "config"}
