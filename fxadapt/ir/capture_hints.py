"""What a failed capture tells the user: where the trace failed and what to change (``fxadapt.ir.capture``).

``where_failed`` names the user's source line (or the op); ``hint`` recognises causes with a known fix (a KV
cache in the output, a module conversion inside ``forward``); ``data_dependent`` explains control flow on
tensor values in one line: which module's method does it (``DbrxExperts.forward``), what it does (loops
over a tensor's values, branches on one, or makes a shape depend on values) and how to make it
value-independent.
"""

from __future__ import annotations

import inspect
import re

from torch import nn

from fxadapt import frames


def where_failed(e: BaseException, model: nn.Module) -> str:
    """The user's source line (or op) a tracing failure points at."""
    text = str(e)
    m = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', text)
    user = [f for f in m if "/torch/" not in f[0]]
    if user:
        f = user[-1]
        return f"{f[0]}:{f[1]} in {f[2]}: {f[3].strip()}"
    frame = frames.user_frame(e.__traceback__, packages=True)
    if frame is not None:
        return frames.where(frame, source=True)
    op = re.search(r"(aten\.\w+(?:\.\w+)?)", text)
    return op.group(1) if op else type(model).__name__


def _owner(e: BaseException, model: nn.Module) -> str:
    """``Class.method`` of the model's module whose code holds the user's line a tracing failure points at
    (``DbrxExperts.forward``), or ``""``."""
    m = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', str(e))
    user = [f for f in m if "/torch/" not in f[0]]
    if not user:
        return ""
    path, line, name = user[-1][0], int(user[-1][1]), user[-1][2]
    for cls in dict.fromkeys(type(mod) for mod in model.modules()):
        code = getattr(inspect.unwrap(getattr(cls, name, None) or (lambda: None)), "__code__", None)
        if code is not None and code.co_filename == path and \
                code.co_firstlineno <= line <= max((ln for *_, ln in code.co_lines() if ln), default=0):
            return f"{cls.__name__}.{name}"
    return ""


def data_dependent(e: BaseException, model: nn.Module, where: str) -> str:
    """What the model does where its control flow depends on tensor values, and what to change (one line)."""
    src = where.rsplit(": ", 1)[-1]
    does = ("loops over the values of a tensor (its number of iterations depends on the input, as in an "
            "expert loop over the experts its tokens are routed to)" if src.startswith("for ")
            else "branches on a tensor's value" if src.startswith(("if ", "while ", "elif "))
            else "makes a shape depend on tensor values (.nonzero(), .item(), boolean-mask indexing)")
    return (f"{_owner(e, model) or 'forward'} {does}; forward branches or loops on tensor values, which "
            "torch.export cannot trace with fixed control flow (data-dependent): make that code "
            "value-independent (for a mixture of experts, run every expert on fixed shapes: a loop over "
            "range(num_experts) with the routing weights as a dense mask, or transformers' "
            "experts_implementation='grouped_mm' where the model offers it, as Mixtral does)")


def hint(text: str) -> str:
    cache = re.search(r"Found <class '[\w.]*?(\w*Cache)'> in output", text)
    if cache:
        return (f"the output holds a {cache.group(1)} (a KV cache, no tensor pytree): "
                f"leave use_cache unset (capture then passes use_cache=False) or set use_cache=False")
    swap = re.search(r"Couldn't swap (\w+)\.(\w+)", text)
    if swap:   # Module._apply swaps every parameter, which the fake parameters of a trace refuse
        return (f"forward converts a {swap.group(1)} module (module.to(...) / .float() / .half()), which "
                "torch.export cannot trace: convert the model once before transform and remove the "
                "conversion from forward")
    return ""
