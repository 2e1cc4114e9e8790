"""Expert counts of written-back mixture-of-experts models (``fxadapt.ops.routing`` removes whole experts).

The modules need nothing here: an expert module's ``num_experts`` (``MixtralExperts``: ``gate_up_proj
[E, 2I, H]``) and its router's (``weight [E, H]``) equal an old axis size of their own tensors, so the
width write-back sets them to the new one (``fxadapt.writeback.widths``, evidence 2) and the eager
``grouped_mm`` experts implementation bins the tokens into ``E'`` experts (``histc(bins=num_experts)``).
The router's ``top_k`` is the tokens' expert count and stays (at least ``top_k`` experts are kept).

The config states the count (``num_local_experts`` in Mixtral, ``num_experts`` in Qwen2-MoE) when every
expert module agrees, like the other sizes of ``fxadapt.writeback.hf``; otherwise the recipe carries it.

>>> import torch
>>> class Experts(torch.nn.Module):
...     def __init__(self, e):
...         super().__init__()
...         self.num_experts, self.w = e, torch.nn.Parameter(torch.zeros(e, 2, 3))
>>> expert_count(torch.nn.Sequential(Experts(3), Experts(3)), torch.nn.Sequential(Experts(4), Experts(4)))
(4, 3)
"""

from __future__ import annotations

from torch import nn

EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def _holds_experts(mod: nn.Module) -> bool:
    n = getattr(mod, "num_experts", None)
    return type(n) is int and any(p.dim() == 3 and p.shape[0] == n for p in mod.parameters(recurse=False))


def expert_count(model: nn.Module, original: nn.Module) -> tuple[int, int] | None:
    """``(old, new)`` expert count of the modules holding 3-D expert tensors, when all of them agree."""
    new = dict(model.named_modules())
    pairs = {(mod.num_experts, new[path].num_experts) for path, mod in original.named_modules()
             if path in new and _holds_experts(mod) and type(getattr(new[path], "num_experts", None)) is int}
    return pairs.pop() if len(pairs) == 1 else None
