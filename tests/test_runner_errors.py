"""Pipeline errors name their step: an unexpected exception becomes one ``InternalError`` naming the step and
the steps before it (the original chained), or a ``UserCodeError`` naming the file and line when it was
raised in the user's own code (a ``loss_fn``); an ``FxAdaptError`` passes through with ``.step`` and a PEP 678
note; ``SearchInterrupted`` and ``KeyboardInterrupt`` pass through untouched.

The simulated bugs below raise from this file, which the runner would attribute to the user: those tests
switch the attribution off (``library_only``), so they see what a bug inside fxadapt gives."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.errors import BudgetError, InternalError, SearchInterrupted, UserCodeError
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.pipeline import runner
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


@pytest.fixture
def library_only(monkeypatch):
    monkeypatch.setattr(runner, "user_frame", lambda tb: None)


def test_an_unexpected_error_is_an_internal_error_naming_the_step(library_only):
    cause = ValueError("widths disagree\nsecond line")
    with pytest.raises(InternalError) as e:
        run_steps(OK + (Step("plan", _raises(cause)), Step("verify", lambda j: j)), J())
    msg = str(e.value)
    assert msg.startswith("step 'plan' failed (after capture, analyze): ValueError: widths disagree — a bug "
                          "in fxadapt, not in your input; please report it")
    assert "\n" not in msg and "verify" not in msg
    assert e.value.__cause__ is cause
    assert isinstance(e.value, fxadapt.FxAdaptError) and fxadapt.InternalError is InternalError


def test_the_first_step_says_so(library_only):
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


def test_transform_names_the_step_that_broke(monkeypatch, library_only):
    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'widths'")

    monkeypatch.setattr(tr, "Reference", broken)
    with pytest.raises(InternalError) as e:
        fxadapt.transform(example_model(), 0.5, (X,))
    assert str(e.value).startswith("step 'write_back' failed (after capture, analyze, plan, materialize, "
                                   "rewire_blocks, verify): AttributeError: 'NoneType' object has no "
                                   "attribute")
    assert isinstance(e.value.__cause__, AttributeError)


def test_transform_errors_carry_their_step():
    with pytest.raises(BudgetError, match="no prunable channel group") as e:
        fxadapt.transform(nn.Sequential(nn.ReLU()), 0.5, (torch.randn(1, 3),))
    assert e.value.step == "analyze" and e.value.__notes__ == ["in fxadapt step 'analyze' (after capture)"]


def test_an_error_in_the_users_loss_fn_names_their_line():
    def loss_fn(out, y):
        raise ValueError("labels must be floats")   # the user's bug

    x, y = torch.randn(16, *EXAMPLE_INPUT_SHAPE[1:]), torch.randint(0, 10, (16,))
    cfg = fxadapt.TransformConfig(search=fxadapt.SearchConfig(steps=2, warmup=0, batch_size=8, progress=False,
                                                             loss_fn=loss_fn))
    with pytest.raises(UserCodeError) as e:
        fxadapt.transform(example_model(), 0.5, (X,), data=(x, y), strategy="dna", config=cfg)
    msg = str(e.value)
    assert "failed in your code (test_runner_errors.py:" in msg \
            and "in loss_fn): ValueError: labels must be" in msg
    assert msg.startswith(f"step '{e.value.step}' failed in your code")
    assert isinstance(e.value, fxadapt.InputError) and isinstance(e.value.__cause__, ValueError)
    assert "\n" not in msg


def test_user_frame_reads_the_innermost_frame():
    try:
        {}["missing"]
    except KeyError as err:
        assert runner.user_frame(err.__traceback__).startswith("test_runner_errors.py:")
    try:
        torch.zeros(2).view(3)
    except RuntimeError as err:   # raised inside torch: the innermost Python frame is this file's
        assert runner.user_frame(err.__traceback__) is not None
    assert runner.user_frame(None) is None

