"""ExportedProgram handoff: adapted model -> ExportedProgram (outputs equal, dynamic batch) and an
ExportedProgram -> fxadapt's captured graph (the same analysis as capturing the model itself)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.errors import InputError
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.export.onnx import ExportError
from fxadapt.export.program import captured_from_program, from_exported_program, to_exported_program


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(EXAMPLE_INPUT_SHAPE)


@pytest.fixture(scope="module")
def adapted(x):
    return fxadapt.transform(example_model().eval(), 0.5, (x,), fold_bn=False, output="graph")


def test_round_trip_transform_result(adapted, x):
    ep = to_exported_program(adapted, (x,))
    assert isinstance(ep, torch.export.ExportedProgram)
    xs = torch.randn(3, *EXAMPLE_INPUT_SHAPE[1:])                     # another batch size: dynamic axis
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(xs), adapted.eval()(xs), rtol=1e-5, atol=1e-6)
    convs = [n for n in ep.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in adapted.modules())


def test_round_trip_back_to_a_trainable_graph(adapted, x):
    gm = from_exported_program(to_exported_program(adapted, (x,)))
    kinds = lambda m: sorted(type(c).__name__ for c in m.modules() if not list(c.children()))  # noqa: E731
    assert kinds(gm) == kinds(adapted)                                    # the same nn modules again
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), adapted.eval()(x), rtol=1e-5, atol=1e-6)


def test_captured_from_program_analyses_like_capture(x):
    ep = torch.export.export(example_model().eval(), (x,), strict=False)
    gm = captured_from_program(ep, (x,), model=example_model())
    ours, theirs = fxadapt.analyze(gm), fxadapt.analyze(example_model(), (x,))
    assert [g.width for g in ours.groups] == [g.width for g in theirs.groups]
    assert [g.prunable for g in ours.groups] == [g.prunable for g in theirs.groups]
    assert len(ours.blocks) == len(theirs.blocks)
    assert ours.macs() == theirs.macs()


def test_captured_program_transforms(x):
    ep = torch.export.export(example_model().eval(), (x,), strict=False)
    gm = captured_from_program(ep, (x,))
    small = fxadapt.transform(gm, 0.5, (x,), fold_bn=False)
    assert small(x).shape == example_model()(x).shape


def test_training_mode_program_is_refused(x):
    ep = torch.export.export(example_model().train(), (x.repeat(2, 1, 1, 1),), strict=False)
    with pytest.raises(InputError, match="training mode"):
        captured_from_program(ep)


def test_not_a_program():
    with pytest.raises(InputError, match="ExportedProgram"):
        captured_from_program(nn.Linear(2, 2), (torch.randn(1, 2),))


def test_unexportable_model_raises_export_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].reshape(-1, 2) if int((x > 0).sum()) % 2 == 0 else x

    with pytest.raises(ExportError, match="torch.export failed"):
        to_exported_program(DataDependent(), (torch.randn(1, 4),))
