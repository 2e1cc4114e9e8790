"""``fxadapt.ir.inputs``: every accepted form of example inputs becomes one ``Inputs(args, kwargs)``;
``capture`` and ``shape_check`` take keyword inputs (dynamic batch included); wrong forms are
``InputError``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fxadapt.passes.shape_check import shape_check
from torch import nn

import fxadapt
from fxadapt import InputError
from fxadapt.ir.capture import BATCH_KEY, INPUTS_KEY, normalize_inputs
from fxadapt.ir.inputs import Inputs, as_inputs

X = torch.randn(2, 4)
M = torch.ones(2, 3, dtype=torch.long)


@pytest.mark.parametrize("given, args, keys", [
    (X, (X,), []),
    ((X,), (X,), []),
    ((X, {"m": M}), (X, {"m": M}), []),                 # a positional pytree, not an (args, kwargs) pair
    ({"x": X, "mask": M}, (), ["x", "mask"]),
    (((X,), {"mask": M}), (X,), ["mask"]),
    (((), {"mask": M}), (), ["mask"]),
    (Inputs((X,), {"mask": M}), (X,), ["mask"]),
])
def test_accepted_forms(given, args, keys):
    inp = as_inputs(given)
    assert isinstance(inp, Inputs)
    assert len(inp.args) == len(args) \
            and all(a is b for a, b in zip(inp.args, args) if isinstance(a, torch.Tensor))
    assert list(inp.kwargs) == keys


@pytest.mark.parametrize("bad, words", [
    ([X], ["got list", "tuple", "dict", "(x,)"]),
    ((3, "a"), ["no tensor"]),
    ({}, ["no tensor"]),
    ({1: X}, ["keyword names", "[1]"]),
    (None, ["got NoneType"]),
])
def test_rejected_forms_say_what_is_accepted(bad, words):
    with pytest.raises(InputError) as info:
        as_inputs(bad)
    msg = str(info.value)
    assert "\n" not in msg and "a dict of keyword inputs" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_methods():
    inp = Inputs((X, 3), {"mask": M, "pair": [X, None]})
    assert [t.shape for t in inp.tensors()] == [(2, 4), (2, 3), (2, 4)]
    assert inp.batch == 2 and Inputs((torch.tensor(1.0),), {}).batch == 1
    half = inp.map(lambda t: t.half() if t.is_floating_point() else t)
    assert half.args[0].dtype == torch.float16 and half.args[1] == 3
    assert half.kwargs["mask"].dtype == torch.long and half.kwargs["pair"][1] is None
    assert inp.call(lambda *a, **k: (len(a), sorted(k))) == (2, ["mask", "pair"])
    assert inp.with_kwargs(use_cache=False, mask=0).kwargs["mask"] is M
    with pytest.raises(dataclasses.FrozenInstanceError):
        inp.args = ()


def test_normalize_inputs_keeps_positional_callers_working():
    assert normalize_inputs(X)[0] is X
    assert normalize_inputs((X, X)) == (X, X)
    with pytest.raises(InputError, match="positional"):
        normalize_inputs({"x": X})


class Masked(nn.Module):
    """A positional image, keyword-only integer token ids and an optional mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.proj = nn.Linear(4, 8)

    def forward(self, x, *, ids, mask=None):
        h = self.emb(ids)
        if mask is not None:
            h = h * mask[..., None]
        return self.proj(x)[:, None] + h


@pytest.mark.parametrize("form", ["pair", "dict"])
def test_capture_keyword_inputs_with_dynamic_batch(form):
    torch.manual_seed(0)
    model = Masked().eval()
    x, ids, mask = torch.randn(1, 4), torch.randint(0, 50, (1, 3)), torch.ones(1, 3)
    kwargs = {"mask": mask, "ids": ids}   # not in signature order
    ex = ((x,), kwargs) if form == "pair" else {"x": x, **kwargs}
    gm = fxadapt.capture(model, ex)
    recorded = gm.meta[INPUTS_KEY]
    assert isinstance(recorded, Inputs) and list(recorded.kwargs) == list(as_inputs(ex).kwargs)
    assert gm.meta[BATCH_KEY] == 1
    x3, ids3, mask3 = torch.randn(3, 4), torch.randint(0, 50, (3, 3)), torch.rand(3, 3)
    with torch.no_grad():
        torch.testing.assert_close(as_inputs(ex).call(gm), as_inputs(ex).call(model))
        torch.testing.assert_close(gm(x3, ids=ids3, mask=mask3), model(x3, ids=ids3, mask=mask3))
    res = shape_check(gm, Inputs((x3,), {"mask": mask3, "ids": ids3}))
    assert res.graph_module.meta[BATCH_KEY] == 3
    assert fxadapt.analyze(gm).groups


def test_shape_check_orders_keywords_by_the_graph_spec():
    model = Masked().eval()
    gm = fxadapt.capture(model, {"ids": torch.zeros(2, 3, dtype=torch.long), "x": torch.randn(2, 4)})
    shape_check(gm, {"x": torch.randn(5, 4), "ids": torch.zeros(5, 3, dtype=torch.long)})
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert tuple(out[0].meta["val"].shape) == (5, 3, 8)


def test_capture_rejects_unknown_keywords_as_input_error():
    with pytest.raises(InputError, match="fails on the example inputs.*keywords"):
        fxadapt.capture(Masked(), ((torch.randn(1, 4),), {"idz": torch.zeros(1, 3, dtype=torch.long)}))
