"""The pass runner: a flat list of named steps run in order on an immutable ``Job``.

Each step is a function ``Job -> Job`` (it returns a new job via ``dataclasses.replace``; the graph passes it
calls are ``GraphModule -> PassResult`` on their own copies). After every step that produced a new graph
the runner lints it (``Graph.lint``) and shape-checks it on the example inputs (``passes.shape_check``
under ``FakeTensorMode``: exact shapes, no compute),
so a broken rewrite is reported at the step that broke it. A step's ``when`` decides from the job whether it
runs at all (``fold_bn`` only when asked, ``export`` only for an ExportedProgram result); the runner reports
progress as ``progress(name, done, total)`` and records each step's wall time.

Example:
    >>> from dataclasses import dataclass, replace
    >>> @dataclass(frozen=True)
    ... class J:
    ...     n: int = 0
    ...     gm: object = None
    ...     inputs: object = None
    ...     timings: tuple = ()
    >>> steps = (Step("double", lambda j: replace(j, n=2 * j.n)), Step("inc", lambda j: replace(j, n=j.n + 1)))
    >>> out = run_steps(steps, J(n=3))
    >>> out.n, [name for name, _ in out.timings]
    (7, ['double', 'inc'])
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from fxadapt.passes.shape_check import shape_check


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable
    when: Callable = lambda job: True


def run_steps(steps: tuple[Step, ...], job, progress: Callable | None = None):
    """Run the steps whose ``when`` holds; lint and shape-check every new graph (see module docstring)."""
    active = [s for s in steps if s.when(job)]
    for i, step in enumerate(active, 1):
        t0 = time.perf_counter()
        before = job.gm
        job = step.run(job)
        if job.gm is not None and job.gm is not before:
            job.gm.graph.lint()
            shape_check(job.gm, job.inputs, fake=True)
        job = dataclasses.replace(job, timings=job.timings + ((step.name, time.perf_counter() - t0),))
        if progress is not None:
            progress(step.name, i, len(active))
    return job
