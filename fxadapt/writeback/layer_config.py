"""Per-module config views: sizes a module reads from the config every layer shares, where its layer's differ.

A Hugging Face module may read a size from ``self.config`` at run time instead of keeping it as an
attribute: Phi-3's attention splits its fused ``qkv_proj`` output at ``config.num_attention_heads *
head_dim``. When the plan gives the layers different head counts the one config cannot state them all
(``config_ops`` sets a field only where every layer agrees), so such a module gets its own view of the
config (``recipe.ConfigView``, a ``module_config`` operation) where its sizes differ from what the shared
config says after the config operations:

    for a module M holding the model's config, with attention evidence kind k: (old, new) (``widths``),
    every config field f of kind k (``hf.FIELDS``) whose original value is old:
        view(M).f = new   where   config.f != new

A module that does not read the field is unaffected (the view reads everything else from the shared
config, live). Modules are matched to their original paths (the evidence's) by identity across the depth
operations; inserted copies carry a copy of the config already and are left as they are.
"""

from __future__ import annotations

from torch import nn

from fxadapt.writeback.hf import FIELDS
from fxadapt.writeback.recipe import ConfigView

KINDS = ("heads", "kv", "head_dim")


def original_paths(model: nn.Module) -> dict[int, str]:
    """``id(module) -> path`` before the depth operations (the paths the evidence names)."""
    return {id(m): p for p, m in model.named_modules()}


def module_config_ops(work: nn.Module, original: nn.Module, paths: dict[int, str],
                      evidence: dict) -> list[dict]:
    """``module_config`` operations for the modules of ``work`` (final tree) that hold the model's config and
    whose attention sizes (``evidence``: original path -> {kind: (old, new)}) differ from what that config
    states now (``original``: the unchanged model, whose config says what a field meant)."""
    cfg, base = work.config, original.config
    alias = getattr(base, "attribute_map", None) or {}
    ops = []
    for path, mod in work.named_modules():
        held = mod.__dict__.get("config")
        shared = held._base if isinstance(held, ConfigView) else held
        pairs = evidence.get(paths.get(id(mod)), {})
        if shared is not cfg or not pairs:
            continue
        for kind in KINDS:
            old, new = pairs.get(kind, (None, None))
            # a field read under its alias (Moonshine's num_key_value_heads is decoder_num_key_value_heads)
            # is stored, and viewed, under the name it maps to
            for name in dict.fromkeys(alias.get(n, n) for n in FIELDS[kind]):
                if old is not None and base.__dict__.get(name) == old and getattr(cfg, name, None) != new:
                    ops.append({"op": "module_config", "module": path, "field": name, "value": new})
    return ops
