"""The one op-rule table (``RULES``), filled by the rule families imported below.

>>> import torch
>>> from fxadapt.ops import RULES
>>> RULES[torch.ops.aten.conv2d.default].kind
'produces'
"""

from fxadapt.ops import indexing, layers, pointwise, reshape  # noqa: F401  (registration)
from fxadapt.ops.core import RULES, Blocked, Call, Ctx, RuleRecord, RuleSpec, rule

__all__ = ["RULES", "Blocked", "Call", "Ctx", "RuleRecord", "RuleSpec", "rule"]
