"""Namespaced ``node.meta`` / ``GraphModule.meta`` keys written by fxadapt passes and analyses (one place for
all of them).

Every value stored under a node key is a frozen dataclass (or a tuple of them, or a plain str/bool), so a
later pass can read but never mutate an earlier analysis' conclusions.
"""

# node.meta
ATEN = "fxadapt.aten"            # AtenCall: the ATen op a lifted ``call_module`` node stands for
TRACK = "fxadapt.track"          # Track | None: which axes of the node's output carry channel labels
RULE = "fxadapt.rule"            # RuleRecord: which registry entry handled the node, and its verdict
GROUP = "fxadapt.group"          # tuple[int, ...]: ids of the channel groups the node's output touches
BLOCK = "fxadapt.block"          # tuple[int, ...]: ids of the residual blocks whose body holds the node
SOURCE = "fxadapt.source"        # str: the user's source line this node was traced from
REPEAT_OF = "fxadapt.repeat_of"  # str: the exit node of the block this inserted residual join repeats
GATE = "fxadapt.gate"            # bool: an elastic gate node (removed by ``strip_gates``)

# GraphModule.meta
BATCH = "fxadapt.batch"          # int: the example batch size the graph's shapes were recorded at
INPUTS = "fxadapt.inputs"        # Inputs: the example inputs the graph was captured with
LIFTED = "fxadapt.lifted"        # int: how many ATen calls ``lift_modules`` turned into modules
FOLDED_BN = "fxadapt.folded_bn"  # int: how many batch norms ``fold_bn`` folded
DYNAMIC = "fxadapt.dynamic"      # tuple[(input name, axes)]: the input axes capture left symbolic
WEIGHTS = "fxadapt.weights"      # Callable[[str], Tensor]: reads a meta graph's tensor by its target
# str: the attention mode the graph was analysed with ("heads", "head_dim", "auto")
ATTENTION = "fxadapt.attention"
