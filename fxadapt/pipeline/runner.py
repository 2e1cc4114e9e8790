"""The pass runner: a flat list of named steps run in order on an immutable ``Job``.

Each step is a function ``Job -> Job`` (it returns a new job via ``dataclasses.replace``; the graph passes it
calls are ``GraphModule -> PassResult`` on their own copies). After every step that produced a new graph
the runner lints it (``Graph.lint``) and shape-checks it on the example inputs (``passes.shape_check``
under ``FakeTensorMode``: exact shapes, no compute),
so a broken rewrite is reported at the step that broke it. A step's ``when`` decides from the job whether it
runs at all (``fold_bn`` only when asked, ``export`` only for an ExportedProgram result); the runner reports
progress as ``progress(name, done, total)`` and records each step's wall time.

Errors name the step they came from: an ``FxAdaptError`` (bad input, a budget out of reach, a failed check)
passes through as raised, with ``.step`` set to the step's name and a note (PEP 678) ``in fxadapt step
'verify' (after capture, analyze, ...)``; any other exception raised in the user's own code (the innermost
frame outside fxadapt, torch, the standard library and installed packages: a ``loss_fn``, a dataset)
becomes a ``UserCodeError`` naming that file and line; the rest is a bug in fxadapt and becomes one
``InternalError`` naming the step and the steps before it, raised ``from`` the original. ``KeyboardInterrupt``
and ``SearchInterrupted`` (a search stopped on purpose) pass through unchanged.

Example:
    >>> from dataclasses import dataclass, replace
    >>> @dataclass(frozen=True)
    ... class J:
    ...     n: int = 0
    ...     gm: object = None
    ...     inputs: object = None
    ...     timings: tuple = ()
    >>> steps = (Step("double", lambda j: replace(j, n=2 * j.n)),
    ...          Step("inc", lambda j: replace(j, n=j.n + 1)))
    >>> out = run_steps(steps, J(n=3))
    >>> out.n, [name for name, _ in out.timings]
    (7, ['double', 'inc'])
    >>> run_steps(steps + (Step("oops", lambda j: j.missing),), J(n=3))
    Traceback (most recent call last):
    fxadapt.errors.InternalError: step 'oops' failed (after double, inc): AttributeError: 'J' object has no
    attribute 'missing' — a bug in fxadapt, not in your input; please report it with the model (the original
    exception is chained)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from fxadapt import frames
from fxadapt.errors import FxAdaptError, InternalError, SearchInterrupted, UserCodeError
from fxadapt.passes.shape_check import shape_check


def _always(job: Any) -> bool:
    return True


@dataclass(frozen=True)
class Step:
    """A named pure function ``Job -> Job``, run when ``when(job)`` holds."""

    name: str
    run: Callable[[Any], Any]
    when: Callable[[Any], bool] = _always


def run_steps(steps: tuple[Step, ...], job: Any, progress: Callable[[str, int, int], object] | None = None,
              then: Mapping[Step, Callable[[Any], Any]] | None = None) -> Any:
    """Run the steps whose ``when`` holds; lint and shape-check every new graph (see module docstring).

    ``then``: the orchestrator's follow-up after a step (``fxadapt.pipeline.transform``: after ``write_back``,
    its retry loop: diagnose, re-plan, write back again), run as part of that step (its errors name it)
    and free to run steps itself; steps never do."""
    active = [s for s in steps if s.when(job)]
    for i, step in enumerate(active, 1):
        t0 = time.perf_counter()
        done = [s.name for s in active[:i - 1]]
        job = _run_step(step, job, done)
        job = dataclasses.replace(job, timings=job.timings + ((step.name, time.perf_counter() - t0),))
        if then is not None and step in then:
            job = _run_step(Step(step.name, then[step]), job, done)
        if progress is not None:
            progress(step.name, i, len(active))
    return job


def _run_step(step: Step, job, done: list[str]):
    """``step`` on ``job`` and the checks of the graph it made; an error names the step (module docstring)."""
    before = job.gm
    try:
        job = step.run(job)
        if job.gm is not None and job.gm is not before:
            job.gm.graph.lint()
            shape_check(job.gm, job.inputs, fake=True)
    except SearchInterrupted:
        raise
    except FxAdaptError as e:
        if getattr(e, "step", None) is None:
            e.step = step.name
            _add_note(e, f"in fxadapt step '{step.name}' ({_after(done)})")
        raise
    except Exception as e:
        lines = str(e).strip().splitlines()
        what = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        where = user_frame(e.__traceback__)
        if where is not None:
            err = UserCodeError(f"step '{step.name}' failed in your code ({where}): {what} — fix the "
                                "function you passed (loss_fn, the data, a callback); the original exception "
                                "is chained")
        else:
            err = InternalError(f"step '{step.name}' failed ({_after(done)}): {what} — a bug in fxadapt, not "
                                "in your input; please report it with the model (the original exception is "
                                "chained)")
        err.step = step.name
        raise err from e
    return job


def user_frame(tb: TracebackType | None) -> str | None:
    """``file:line in function`` of the innermost frame of ``tb`` when it is the user's (``fxadapt.frames``:
    outside fxadapt, torch, the standard library and installed packages: the user's own callable raised),
    else None."""
    f = frames.user_frame(tb, innermost=True)
    return frames.where(f) if f is not None else None


def _after(done: list[str]) -> str:
    return f"after {', '.join(done)}" if done else "the first step"


def _add_note(e: BaseException, note: str) -> None:
    """PEP 678's ``add_note`` (Python 3.11+); on 3.10 the note is kept in ``__notes__`` alone."""
    if hasattr(e, "add_note"):
        e.add_note(note)
    else:
        e.__notes__ = [*getattr(e, "__notes__", []), note]
