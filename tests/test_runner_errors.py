"""Pipeline errors name their step: an unexpected exception becomes one ``InternalError`` naming the step and
the steps before it (the original chained); an ``FxAdaptError`` passes through with ``.step`` and a PEP 678
note; ``SearchInterrupted`` and ``KeyboardInterrupt`` pass through untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.errors import BudgetError, InternalError, SearchInterrupted
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.pipeline import transform as tr
from fxadapt.pipeline.runner import Step, run_steps

X = torch.randn(EXAMPLE_INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


@dataclasses.dataclass(frozen=True)
class J:
    n: int = 0
    gm: object = None
    inputs: object = None
    timings: tuple = ()


def _raises(error: BaseException):
    def run(job):
        raise error
    return run


OK = (Step("capture", lambda j: j), Step("analyze", lambda j: j))


def test_an_unexpected_error_is_an_internal_error_naming_the_step():
    cause = ValueError("widths disagree\nsecond line")
    with pytest.raises(InternalError) as e:
        run_steps(OK + (Step("plan", _raises(cause)), Step("verify", lambda j: j)), J())
    msg = str(e.value)
    assert msg.startswith("step 'plan' failed (after capture, analyze): ValueError: widths disagree — a bug in "
                          "fxadapt, not in your input; please report it")
    assert "\n" not in msg and "verify" not in msg
    assert e.value.__cause__ is cause
    assert isinstance(e.value, fxadapt.FxAdaptError) and fxadapt.InternalError is InternalError


def test_the_first_step_says_so():
    with pytest.raises(InternalError, match=r"step 'capture' failed \(the first step\): KeyError: 'x'"):
        run_steps((Step("capture", _raises(KeyError("x"))),), J())


def test_an_fxadapt_error_passes_through_with_its_step():
    err = BudgetError("budget out of reach")
    with pytest.raises(BudgetError) as e:
        run_steps(OK + (Step("plan", _raises(err)),), J())
    assert e.value is err and str(err) == "budget out of reach"
    assert err.step == "plan"
    assert err.__notes__ == ["in fxadapt step 'plan' (after capture, analyze)"]


@pytest.mark.parametrize("error", [SearchInterrupted("stopped at step 6 of 10"), KeyboardInterrupt()])
def test_interruptions_pass_through_unchanged(error):
    with pytest.raises(type(error)) as e:
        run_steps(OK + (Step("plan", _raises(error)),), J())
    assert e.value is error
    assert not hasattr(error, "step") and not getattr(error, "__notes__", [])


def test_transform_names_the_step_that_broke(monkeypatch):
    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'widths'")

    monkeypatch.setattr(tr, "Reference", broken)
    with pytest.raises(InternalError) as e:
        fxadapt.transform(example_model(), 0.5, (X,))
    assert str(e.value).startswith("step 'write_back' failed (after capture, analyze, plan, materialize, "
                                   "rewire_blocks, verify): AttributeError: 'NoneType' object has no attribute")
    assert isinstance(e.value.__cause__, AttributeError)


def test_transform_errors_carry_their_step():
    with pytest.raises(BudgetError, match="no prunable channel group") as e:
        fxadapt.transform(nn.Sequential(nn.ReLU()), 0.5, (torch.randn(1, 3),))
    assert e.value.step == "analyze" and e.value.__notes__ == ["in fxadapt step 'analyze' (after capture)"]
