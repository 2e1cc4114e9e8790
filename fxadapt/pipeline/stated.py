"""What a Hugging Face model's config can state, for ``layers="uniform"`` (``fxadapt.planning.stated``).

From the model's config (before adaptation: hidden ``H``, heads ``A``, key/value heads ``K``, head size
``d``, explicit or ``H / A``) and the analysis:

- the hidden group: the group holding the input embedding's weight with ``H`` units;
- the whole-head groups: groups of ``K`` units whose granularity is a multiple of ``d`` or whose parameters
  belong to an attention module (a module with ``num_heads`` / ``head_dim`` / ``head_size`` ...), one
  unit = one key/value head with its ``A / K`` query heads;
- ``ok(h, j)``: a copy of the config with hidden ``h``, ``j * A / K`` heads and ``j`` key/value heads passes
  the config's own validation (Llama: ``h % heads == 0``) and, where the config derives the head size
  (no ``head_dim``/``d_kv`` field: GPT-2, BERT), ``h == heads * d`` (whole heads move with the hidden size).

Anything else (not a Hugging Face model, no heads found, ``layers="any"``): no ``Statable``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from fxadapt.planning.stated import Statable
from fxadapt.writeback.hf import FIELDS, is_hf, raw, valid

if TYPE_CHECKING:
    from fxadapt.analysis.analyze import Analysis

_ATTENTION_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "head_dim", "head_size",
                    "attention_head_size")


def statable(model: nn.Module, a: Analysis) -> Statable | None:
    """The ``Statable`` of ``model`` (an ``nn.Module``) over analysis ``a`` (module docstring), or None."""
    if not isinstance(model, nn.Module) or not is_hf(model):
        return None
    cfg = model.config
    hidden_f = next((f for f in FIELDS["hidden"] if type(raw(cfg, f)) is int), None)
    heads_f = next((f for f in FIELDS["heads"] if type(raw(cfg, f)) is int), None)
    if hidden_f is None or heads_f is None:
        return None
    H, A = raw(cfg, hidden_f), raw(cfg, heads_f)
    kv_f = next((f for f in FIELDS["kv"] if type(raw(cfg, f)) is int), None)
    K = raw(cfg, kv_f) if kv_f else A
    explicit = next((f for f in FIELDS["head_dim"] if type(raw(cfg, f)) is int), None)
    d = raw(cfg, explicit) if explicit else H // A
    if not K or A % K:
        return None
    emb = _input_embedding(model)
    hidden = next((g.id for g in a.groups if g.units == H and emb in _params(g)), None)
    heads = tuple(g.id for g in a.groups if g.units == K and g.id != hidden and g.prunable
                  and g.reason is None
                  and (g.granularity % d == 0 or any(_in_attention(model, n) for n in _params(g))))
    if not heads:
        return None

    def ok(h: int, j: int) -> bool:
        c = copy.deepcopy(cfg)
        setattr(c, hidden_f, h)
        setattr(c, heads_f, j * A // K)
        if kv_f:
            setattr(c, kv_f, j)
        return (explicit is not None or h == j * A // K * d) and valid(c)

    return Statable(hidden, heads, ok)


def _params(g) -> set[str]:
    return {m.site.ref.target for m in g.members if m.site.kind == "param" and m.site.ref is not None}


def _input_embedding(model: nn.Module) -> str | None:
    try:
        w = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return None
    return next((n for n, p in model.named_parameters() if p is w), None)


def _in_attention(model: nn.Module, name: str) -> bool:
    parts = name.split(".")[:-1]
    for k in (len(parts), len(parts) - 1):
        try:
            mod = model.get_submodule(".".join(parts[:k]))
        except AttributeError:
            continue
        if any(hasattr(mod, attr) for attr in _ATTENTION_ATTRS):
            return True
    return False


def config_ties(model: nn.Module, a: Analysis) -> tuple[frozenset[int], ...]:
    """Groups one config field sizes for every layer kind: where the config has a single intermediate field
    (T5's ``d_ff`` for the encoder's and the decoder's MLPs, which ``layers="uniform"`` alone leaves two
    classes), every prunable group inside a layer (a name with a container index) with that many units is
    tied. Configs with one field per side (BART's ``encoder_ffn_dim`` / ``decoder_ffn_dim``) need none."""
    if not isinstance(model, nn.Module) or not is_hf(model):
        return ()
    fields = [f for f in FIELDS["intermediate"] if type(raw(model.config, f)) is int]
    if len(fields) != 1:
        return ()
    width = raw(model.config, fields[0])
    tied = frozenset(g.id for g in a.groups if g.units == width and g.prunable and g.reason is None
                     and g.granularity == 1 and _params(g)
                     and all(any(p.isdigit() for p in n.split(".")) for n in _params(g)))
    return (tied,) if len(tied) > 1 else ()
