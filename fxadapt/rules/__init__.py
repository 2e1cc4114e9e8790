"""The one op-rule table (``RULES``), filled by the rule families imported below.

>>> import torch
>>> from fxadapt.rules import RULES
>>> RULES[torch.ops.aten.conv2d.default].kind
'produces'
"""

from fxadapt.rules import indexing, layers, pointwise, reshape  # noqa: F401  (registration)
from fxadapt.rules.core import RULES, Blocked, Call, Ctx, RuleRecord, RuleSpec, rule

__all__ = ["RULES", "Blocked", "Call", "Ctx", "RuleRecord", "RuleSpec", "rule"]
