"""Example inputs the way users call their models: positional, keyword, or both.

``as_inputs`` turns every accepted form into one ``Inputs(args, kwargs)``; the model is then called as
``model(*args, **kwargs)``, exactly as ``torch.export.export(model, args, kwargs)`` traces it. Accepted:

- a tensor ``x``                                  -> ``Inputs((x,), {})``
- a tuple of positional inputs (tensors/pytrees)  -> ``Inputs(tuple, {})``
- a dict of keyword inputs (``{"input_ids": ids}``) -> ``Inputs((), dict)``
- a pair ``(args_tuple, kwargs_dict)`` as ``torch.export`` takes them (the first element a tuple, the
  second a dict) -> ``Inputs(args_tuple, kwargs_dict)``
- an ``Inputs`` (returned as is).

The inputs must hold at least one tensor. ``batch`` is the leading dimension of the first tensor leaf
with a dimension (``args`` first, then ``kwargs`` in insertion order); 1 when every tensor is a scalar.

Example:
    >>> import torch
    >>> ids = torch.zeros(2, 5, dtype=torch.long)
    >>> inp = as_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    >>> inp.args, list(inp.kwargs), inp.batch
    ((), ['input_ids', 'attention_mask'], 2)
    >>> as_inputs(((ids,), {"attention_mask": ids})).call(lambda x, attention_mask: x + attention_mask).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxadapt.errors import InputError

ACCEPTED = ("a tensor, a tuple of positional inputs (one tensor: (x,)), a dict of keyword inputs, "
            "or an (args_tuple, kwargs_dict) pair as torch.export takes them")


@dataclass(frozen=True)
class Inputs:
    """Positional and keyword example inputs: the model is called as ``model(*args, **kwargs)``.

    >>> inp = Inputs((torch.ones(3, 2),), {})
    >>> inp.map(lambda t: t.double()).tensors()[0].dtype, inp.batch
    (torch.float64, 3)
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def call(self, model: Callable) -> Any:
        """``model(*args, **kwargs)``.

        >>> Inputs((torch.ones(2),), {}).call(torch.neg)
        tensor([-1., -1.])
        """
        return model(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """The tensor leaves, positional first, then keyword (in insertion order).

        >>> len(Inputs((torch.ones(1), 3), {"m": [torch.ones(1)]}).tensors())
        2
        """
        return [v for v in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(v, torch.Tensor)]

    @property
    def batch(self) -> int:
        """Leading dimension of the first tensor leaf that has one (1 if every tensor is a scalar).

        >>> Inputs((torch.tensor(2.0),), {"x": torch.ones(4, 2)}).batch
        4
        """
        return next((int(v.shape[0]) for v in self.tensors() if v.dim()), 1)

    def map(self, fn: Callable[[torch.Tensor], Any]) -> Inputs:
        """Apply ``fn`` to every tensor leaf (dtype or device changes); other leaves are kept.

        >>> Inputs((torch.ones(1), 2.0), {}).map(lambda t: t * 3).args
        (tensor([3.]), 2.0)
        """
        args, kwargs = pytree.tree_map(lambda v: fn(v) if isinstance(v, torch.Tensor) else v,
                                       (self.args, self.kwargs))
        return Inputs(tuple(args), dict(kwargs))

    def with_kwargs(self, **extra: Any) -> Inputs:
        """A copy with ``extra`` keyword arguments added (those already set win).

        >>> sorted(Inputs((), {"a": torch.ones(1)}).with_kwargs(a=0, use_cache=False).kwargs)
        ['a', 'use_cache']
        """
        return Inputs(self.args, {**extra, **self.kwargs})


def _fail(got: Any, why: str = "") -> InputError:
    return InputError(f"example_inputs must be {ACCEPTED}; got {type(got).__name__}{why}")


def as_inputs(example_inputs: Any) -> Inputs:
    """Normalise ``example_inputs`` to ``Inputs`` (see the module docstring for the accepted forms).

    >>> as_inputs(torch.ones(1, 3)).args[0].shape
    torch.Size([1, 3])
    >>> as_inputs([torch.ones(1)])
    Traceback (most recent call last):
    ...
    fxadapt.errors.InputError: example_inputs must be a tensor, a tuple of positional inputs (one tensor: \
(x,)), a dict of keyword inputs, or an (args_tuple, kwargs_dict) pair as torch.export takes them; got list
    """
    x = example_inputs
    if isinstance(x, Inputs):
        inputs = Inputs(tuple(x.args), dict(x.kwargs))
    elif isinstance(x, torch.Tensor):
        inputs = Inputs((x,), {})
    elif isinstance(x, dict):
        inputs = Inputs((), dict(x))
    elif isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple) and isinstance(x[1], dict):
        inputs = Inputs(x[0], dict(x[1]))
    elif isinstance(x, tuple):
        inputs = Inputs(x, {})
    else:
        raise _fail(x)
    bad = [k for k in inputs.kwargs if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise _fail(x, f" with keyword names that are not identifiers: {bad[:3]}")
    if not inputs.tensors():
        raise _fail(x, " holding no tensor")
    return inputs
