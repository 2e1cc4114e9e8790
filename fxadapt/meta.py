"""Namespaced ``node.meta`` keys written by fxadapt passes and analyses (one place for all of them).

Every value stored under these keys is a frozen dataclass (or a tuple of them), so a later pass can read
but never mutate an earlier analysis' conclusions.
"""

ATEN = "fxadapt.aten"          # AtenCall: the ATen op a lifted ``call_module`` node stands for
TRACK = "fxadapt.track"        # Track | None: which axes of the node's output carry channel labels
RULE = "fxadapt.rule"          # RuleRecord: which op rule handled the node, and its verdict
GROUP = "fxadapt.group"        # tuple[int, ...]: ids of the channel groups the node's output touches
BLOCK = "fxadapt.block"        # tuple[int, ...]: ids of the residual blocks whose body holds the node
SOURCE = "fxadapt.source"      # str: the user's source line this node was traced from

ALL_KEYS = (ATEN, TRACK, RULE, GROUP, BLOCK, SOURCE)
