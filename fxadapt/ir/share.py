"""Copy-on-write sharing: new module trees whose tensors share the user's storage until someone writes.

``lazy_clone(t)`` is ``torch._lazy_clone``: a new tensor over ``t``'s storage, marked copy-on-write on both
sides. Reading either (a forward, ``index_select``, an export trace) costs nothing; the first write through
either one (an optimizer step, ``copy_``, ``.data.mul_``, a ``data_ptr()`` request) gives the writer its own
copy first, so neither side ever sees the other's writes. So

    shared_copy(model)  ==  copy.deepcopy(model)       for every read and every write of either tree,
while it allocates only module objects: the tensors that a transform slices are new tensors anyway, the
ones it leaves unchanged stay the user's storage (memory: the user's model once, plus what changed). The
input model is never mutated: its modules, ``Parameter`` objects and values stay what they were; training
the result (or the user's model) materialises the written tensor for the writer alone.

Where ``torch._lazy_clone`` is missing (an older torch) ``lazy_clone`` is ``clone``: the same semantics,
the memory of a deep copy.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(3, 2)
    >>> w = shared_copy(m)
    >>> w is m, w.weight is m.weight, torch.equal(w.weight, m.weight)
    (False, False, True)
    >>> before = m.weight.detach().clone()
    >>> with torch.no_grad():
    ...     _ = w.weight.mul_(2)          # a write to the copy ...
    >>> torch.equal(m.weight, before)     # ... leaves the original as it was
    True
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

_LAZY = getattr(torch, "_lazy_clone", None)


def lazy_clone(t: torch.Tensor) -> torch.Tensor:
    """A copy-on-write clone of ``t`` (detached; see the module docstring); a plain clone where the
    storage cannot be shared (another torch, a tensor subclass, a meta or non-CPU-like tensor)."""
    t = t.detach()
    if _LAZY is None or type(t) is not torch.Tensor or t.is_meta or t.is_sparse:
        return t.clone()
    try:
        return _LAZY(t)
    except (RuntimeError, NotImplementedError):
        return t.clone()


def shared_tensor(t: torch.Tensor) -> torch.Tensor:
    """``lazy_clone`` keeping the kind: a ``Parameter`` (with its ``requires_grad``) or a plain tensor."""
    if isinstance(t, nn.Parameter):
        return nn.Parameter(lazy_clone(t), requires_grad=t.requires_grad)
    return lazy_clone(t)


M = TypeVar("M", bound=nn.Module)   # the copy is of the model's own class


def shared_copy(model: M, keep: dict | None = None) -> M:
    """``copy.deepcopy(model)`` whose parameters and buffers are copy-on-write clones (tied tensors stay
    tied: one clone per tensor object). ``keep`` maps ``id(tensor)`` to what the copy holds instead (a
    tensor about to be replaced is kept as it is, not cloned)."""
    memo: dict = dict(keep or {})
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            memo[id(t)] = shared_tensor(t)
    return copy.deepcopy(model, memo)


def share_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Make ``dst`` (a parameter or buffer of a copy, same shape) hold ``src``'s values without writing
    ``dst``'s old storage (which may be the user's, copy-on-write): ``dst`` is re-pointed at a lazy clone
    of ``src`` (cast to ``dst``'s dtype), its object identity (and so any tying) kept."""
    with torch.no_grad():
        dst.data = lazy_clone(src) if src.dtype == dst.dtype else src.detach().to(dst.dtype)
