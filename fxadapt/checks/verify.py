"""Checks every adapted model passes (a failure raises ``VerificationError`` saying which):

- it runs on the example inputs and returns the original output structure and shapes;
- its MACs, counted independently (``fxadapt.analysis.count``: FlopCounterMode, attention counted), equal
  what the cost model predicted for the plan (within 0.1%: the cost model is not silently wrong) and lie on
  the right side of the target — within ``tol`` of it when the solver was asked to be strict (only the side
  where the parameters bind: ``Binding.PARAMS``);
- the whole ``Goal`` holds (``check_goal``): the parameter count at most a params budget, and a latency
  budget, resolved again from the goal, against what the solver measured on the target: a measurement
  exists and is the same budget; with ``strict`` at or below it and (latency binding) within ``tol``;
- a change meant to preserve the function (identity, pure growth, BatchNorm folding) matches the reference
  outputs: ``assert_close`` at ``rtol`` and ``atol`` times the outputs' magnitude (at least 1), loosened
  to the dtype's resolution for half precisions; when float32 rounding is the issue the check is repeated
  on float64 copies.

>>> _tolerances(1e-4, 1e-5, __import__("torch").bfloat16)
(0.0625, 0.0625)
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from fxadapt import meta
from fxadapt.analysis.propagate import concrete_shape
from fxadapt.errors import (
    VerificationError,  # noqa: F401  (defined in fxadapt.errors)
)
from fxadapt.ir.inputs import Inputs
from fxadapt.planning.budget import Goal, latency_seconds
from fxadapt.planning.outcome import Binding, Outcome
from fxadapt.planning.solver import SolveConfig, in_window


class Tolerances(Protocol):
    """What ``check_close`` reads from a config (``TransformConfig``, or the write-back's reference)."""

    rtol: float
    atol: float


def outputs(model: nn.Module, inputs: Inputs) -> Any:
    """The model's outputs in eval mode, without grad (its mode is restored)."""
    was = model.training
    try:
        model.eval()
    except NotImplementedError:  # ExportedProgram.module() is already in its exported (eval) mode
        with torch.no_grad():
            return inputs.call(model)
    try:
        with torch.no_grad():
            return inputs.call(model)
    finally:
        model.train(was)


def recorded_outputs(gm: GraphModule) -> Any:
    """The captured graph's outputs as export recorded them (tensors of the right shape and dtype, no
    data), in the model's output structure."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in pytree.tree_leaves(out.args[0])]
    batch = gm.meta.get(meta.BATCH, 1)
    leaves = [torch.empty(concrete_shape(v, batch), dtype=v.dtype, device="meta")
              if isinstance(v, torch.Tensor)
              else v for v in vals]
    info = getattr(gm.graph._codegen, "pytree_info", None)
    spec = getattr(gm, "_out_spec", None) or (info.out_spec if info else None)
    return pytree.tree_unflatten(leaves, spec) if spec is not None else tuple(leaves)


def check_shapes(ref: Any, got: Any) -> None:
    ra, rs = pytree.tree_flatten(ref)
    ga, gs = pytree.tree_flatten(got)
    shape = lambda ts: [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in ts]  # noqa: E731
    if rs != gs or shape(ra) != shape(ga):
        raise VerificationError(f"adapted model's outputs {shape(ga)} differ in structure or shape from the "
                                f"original's {shape(ra)}")


def check_predicted(macs: float, predicted: float) -> None:
    """The independent count equals the cost model's prediction for the plan (the cost model is right)."""
    if abs(macs - predicted) > 1e-3 * max(macs, predicted):
        raise VerificationError(f"the cost model predicted {predicted:,.0f} MACs but the adapted model runs "
                                f"{macs:,.0f}: an op is miscosted (see fxadapt.analyze(...).uncosted)")


def check_params(model: nn.Module, limit: float) -> None:
    """A params budget holds: the parameter count (shared tensors once) is at most ``limit``."""
    n = sum(p.numel() for p in model.parameters())
    if n > limit:
        raise VerificationError(f"adapted model has {n:,} parameters, above the params budget {limit:,.0f}")


def check_budget(macs: float, target: float, base: float, solve: SolveConfig) -> None:
    """The counted MACs lie on the right side of the target (and within ``tol`` of it when strict)."""
    grow = target > base
    side = macs >= target if grow else macs <= target * (1 + 1e-9)
    if not side or (solve.strict and not in_window(macs, target, grow, solve.tol)):
        want = f"within {solve.tol:.1%} " if solve.strict else ""
        raise VerificationError(f"adapted model has {macs:,.0f} MACs, not "
                                f"{want}{'at or above' if grow else 'at or below'} the target {target:,.0f}")


def check_goal(goal: Goal, outcome: Outcome, macs: float, base_macs: float, model: nn.Module,
               solve: SolveConfig) -> None:
    """Every budget of ``goal`` holds for ``model``, which runs ``macs`` (counted) where the original ran
    ``base_macs`` (module docstring)."""
    if goal.macs is not None:   # where the params bind, the MACs lie below their window: only the side holds
        side = dataclasses.replace(solve, strict=False) if outcome.binding is Binding.PARAMS else solve
        check_budget(macs, goal.macs, base_macs, side)
    if goal.params is not None:
        check_params(model, goal.params)
    if goal.latency is not None:
        check_latency(goal, outcome, solve)


def check_latency(goal: Goal, outcome: Outcome, solve: SolveConfig) -> None:
    """A latency budget against the solver's measurement (``Outcome.latency``, seconds on the target)."""
    got = outcome.latency
    if got is None:
        raise VerificationError(f"a latency budget ({goal.latency!r}) but no latency measured on the target: "
                                f"the strategy did not solve it")
    assert goal.latency is not None, "check_latency is for latency budgets"
    budget = latency_seconds(goal.latency, got.base)
    if abs(budget - got.budget) > 1e-9 * max(budget, got.budget):
        raise VerificationError(f"the latency budget {goal.latency!r} is {budget * 1e3:.4f} ms on the "
                                f"target, but the solver measured against {got.budget * 1e3:.4f} ms")
    if not solve.strict:   # a miss is the solver's BudgetWarning (the fastest widths it measured)
        return
    low = (1 - solve.tol) * budget if outcome.binding is Binding.LATENCY else 0.0
    if not low <= got.measured <= budget * (1 + 1e-9):
        raise VerificationError(f"the adapted model measured {got.measured * 1e3:.4f} ms on the target, not "
                                f"within {solve.tol:.1%} at or below the latency budget {budget * 1e3:.4f} "
                                "ms")


def _tolerances(rtol: float, atol: float, dtype: torch.dtype) -> tuple[float, float]:
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(rtol, 8 * eps), max(atol, 8 * eps)


def _scale(ref: Any) -> float:
    leaves = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor) and t.numel()]
    return max([1.0] + [float(t.detach().abs().max()) for t in leaves if t.is_floating_point()])


def check_close(ref: Any, got: Any, cfg: Tolerances, what: str, pair: tuple = (),
                inputs: Inputs | None = None) -> None:
    """``got`` matches ``ref`` (the outputs of ``pair``'s models; see module docstring)."""
    leaves = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    rtol, atol = _tolerances(cfg.rtol, cfg.atol, leaves[0].dtype if leaves else torch.float32)
    try:
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * _scale(ref), check_dtype=False)
    except AssertionError as e:
        if not (pair and _close64(*pair, inputs, cfg)):
            raise VerificationError(f"{what} changed the model's outputs: {str(e).splitlines()[0]}") from e


def _close64(a: nn.Module, b: nn.Module | Callable, inputs: Inputs | None, cfg: Tolerances) -> bool:
    """Whether float64 copies of ``a`` and ``b`` agree (False if they cannot run); a callable ``b`` (a pass)
    is applied to a float64 copy of ``a``."""
    if inputs is None:
        return False
    try:
        ins = inputs.map(lambda t: t.double() if t.is_floating_point() else t)
        ref = outputs(copy.deepcopy(a).double(), ins)
        b64 = copy.deepcopy(b).double() if isinstance(b, nn.Module) else b(copy.deepcopy(a).double())
        got = outputs(b64, ins)
        torch.testing.assert_close(got, ref, rtol=cfg.rtol, atol=cfg.atol * _scale(ref))
        return True
    except Exception:  # noqa: BLE001 - a model that will not run in float64 keeps the float32 verdict
        return False
