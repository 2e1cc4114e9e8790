"""Capture failures whose cause is the model's configuration, not its code: a one-line hint naming what the
model does and what to change (``fxadapt.ir.capture`` appends it to the ``CaptureError``).

Multi-head latent attention (DeepSeek-V2/V3: ``kv_b_proj`` expands the compressed key/value latent to *every*
query head) configured with fewer ``num_key_value_heads`` than ``num_attention_heads``: transformers then
repeats the already full key/value heads ``num_key_value_groups`` times whenever an attention mask is
materialised (eager runs only while the mask is skipped; a padded ``attention_mask`` fails eagerly with the
same broadcast error), so the query and key head counts disagree.

>>> import torch
>>> class Attn(torch.nn.Module):
...     def __init__(self):
...         super().__init__(); self.kv_b_proj = torch.nn.Linear(4, 8); self.num_key_value_groups = 2
...         self.num_heads = 4
>>> latent_kv_hint(torch.nn.Sequential(Attn()), "Attempting to broadcast a dimension of length 8")[:40]
'Attn expands its key/value latent to all'
"""

from __future__ import annotations

from torch import nn


def latent_kv_hint(model: nn.Module, text: str) -> str:
    """The hint for a latent attention with grouped key/value heads, or ``""``."""
    if "broadcast" not in text and "must match the size" not in text:
        return ""
    for mod in model.modules():
        groups = getattr(mod, "num_key_value_groups", 1)
        if hasattr(mod, "kv_b_proj") and isinstance(groups, int) and groups > 1:
            heads = getattr(mod, "num_heads", None) \
                    or getattr(getattr(mod, "config", None), "num_attention_heads", "?")
            return (f"{type(mod).__name__} expands its key/value latent to all {heads} heads, but "
                    f"num_key_value_heads < num_attention_heads makes transformers repeat them {groups} "
                    f"times once an attention mask is materialised (eager fails the same way with a padded "
                    f"attention_mask): set num_key_value_heads = num_attention_heads in the config")
    return ""
