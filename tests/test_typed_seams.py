"""The typed seams of the upper half (issue 24): the verifier checks the whole ``Goal`` (a latency budget
against the solver's measurement), a strategy's ``Outcome`` renders the report's first history entry, a
write-back failure is a typed value whose sentence re-planning never parses, the orchestrator re-plans
over ``Step`` objects, and the capture mode is decided from the parsed goal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fxadapt.checks import verify
from fxadapt.errors import VerificationError
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.pipeline import transform as tr
from fxadapt.pipeline.config import TransformConfig
from fxadapt.planning.budget import Budget, Goal
from fxadapt.planning.outcome import Binding, Latency, Outcome
from fxadapt.planning.solver import SolveConfig
from fxadapt.writeback import Mismatch, NotExpressed, Recipe, SizeConflict, WriteBack
from fxadapt.writeback.probe import Divergence

MS = 1e-3


def _outcome(**kw) -> Outcome:
    return Outcome(None, None, None, **kw)


def test_latency_budget_is_checked_against_the_measurement():
    goal = Goal(latency=0.5)
    ok = _outcome(binding=Binding.LATENCY, latency=Latency(measured=0.99 * MS, budget=1 * MS, base=2 * MS))
    verify.check_latency(goal, ok, SolveConfig(strict=True))
    with pytest.raises(VerificationError, match="no latency measured"):
        verify.check_latency(goal, _outcome(), SolveConfig())
    other = dataclasses.replace(ok, latency=Latency(0.99 * MS, 1.5 * MS, 2 * MS))   # another budget
    with pytest.raises(VerificationError, match="solver measured against"):
        verify.check_latency(goal, other, SolveConfig())
    above = dataclasses.replace(ok, latency=Latency(1.2 * MS, 1 * MS, 2 * MS))
    # not strict: the solver's BudgetWarning stands
    verify.check_latency(goal, above, SolveConfig())
    with pytest.raises(VerificationError, match="at or below the latency budget"):
        verify.check_latency(goal, above, SolveConfig(strict=True))


def test_params_binding_relaxes_only_the_mac_window():
    net = torch.nn.Linear(4, 4)
    strict = SolveConfig(strict=True, tol=0.01)
    with pytest.raises(VerificationError, match="within"):
        verify.check_goal(Goal(macs=100.0), _outcome(), 80.0, 200.0, net, strict)
    verify.check_goal(Goal(macs=100.0), _outcome(binding=Binding.PARAMS), 80.0, 200.0, net, strict)
    with pytest.raises(VerificationError, match="at or below"):
        verify.check_goal(Goal(macs=100.0), _outcome(binding=Binding.PARAMS), 120.0, 200.0, net, strict)


def test_outcome_renders_the_first_history_entry():
    o = _outcome(align=8, grown_under_norm=("norm",), function_error=0.5, ties=(("a", "b"),),
                 notes=("a and b tied", "c and d tied"), history=({"step": 0},))
    assert o.history_entries() == ({"align": 8, "grown_under_norm": ["norm"], "function_error": 0.5,
                                    "ties": [["a", "b"]], "note": "re-planned: a and b tied; c and d tied"},
                                   {"step": 0})
    lat = _outcome(align=4, binding=Binding.LATENCY, latency=Latency(1.0, 2.0, 3.0), searched="dna")
    assert lat.history_entries()[0] == {"align": 4, "latency_s": 1.0, "latency_budget_s": 2.0,
                                        "latency_base_s": 3.0, "binding": "latency", "searched": "dna"}
    assert _outcome(history=({"loss": 1.0},)).history_entries() == ({"loss": 1.0},)   # a search: no entry


def test_write_back_failures_are_typed_and_carry_their_data():
    where = Divergence("reduce.norm", "LayerNorm", (1, 16, 24), (1, 16, 32))
    failed = WriteBack(None, Recipe(), SizeConflict("the written-back model fails on the example inputs: x",
                                                    divergence=where))
    assert failed.failure.divergence is where and str(where) in failed.reason
    assert "computes that size at run time" in failed.reason
    hint = Mismatch("differs", uniform_hint=True)
    assert str(hint).startswith("differs; the layers got different widths") \
            and "layers='uniform'" in str(hint)
    assert WriteBack(None, Recipe(), NotExpressed("no depth")).reason == "no depth"
    assert WriteBack(torch.nn.Identity(), Recipe()).reason is None


def test_replan_steps_are_step_objects_of_the_pipeline():
    assert tr.REPLAN == tr.PIPELINE[2:9] and tr.WRITE_BACK in tr.PIPELINE
    assert [s.name for s in tr.REPLAN] \
            == ["plan", "materialize", "rewire_blocks", "recalibrate_bn", "recover", "fold_bn",
                                           "verify"]
    assert set(tr.RETRIES) == {tr.WRITE_BACK}


@pytest.mark.parametrize("budget, mode", [(Budget(macs=0.5), "static"), (0.5, "static"), ("300M", "static"),
                                          (Budget(latency=0.5), "batch"), ("nonsense", "static")])
def test_capture_mode_reads_the_parsed_goal(budget, mode):
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    job = tr.Job(example_model(), (x,), budget, TransformConfig())
    assert tr._capture_mode(job) == mode
