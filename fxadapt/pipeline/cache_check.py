"""The cached path of a written-back model: what ``generate`` runs, which the captured graph never saw.

The graph of a model with a cache is captured with ``use_cache=False``, so a coupling that only the cached
path has is invisible to the analysis. RWKV allocates every layer's recurrent state from the config,
``(batch, config.hidden_size, num_layers)``, while the attention's part of it has the attention's width:
with use_cache=True every layer's attention width must equal the hidden size. So after the write-back, a
model that generates (it has ``generate``) and whose ``forward`` takes ``use_cache`` is run once more at the
example inputs with ``use_cache=True``; its logits must match the uncached ones (verifier tolerance).

Where the cached run raises with two sizes ``s, t`` (``size of tensor a (s) must match ... b (t)``, or the
first two sizes in parentheses), the groups involved are

    A, B = two prunable groups of the same original width, units and granularity, planned ``s`` and ``t``;
           of several such pairs, the one traced in the innermost module scope shared with the innermost
           module running when it raised (``fxadapt.writeback.probe.failure``)

and ``{A, B}`` together with the layers repeating A or B (``fxadapt.planning.uniform.classes``: the state is
allocated alike for every layer) becomes a tie: the orchestrator (``fxadapt.pipeline.transform``)
re-plans, writes back and checks again with it (reported like the write-back ties), at most ``RETRIES``
times. When it still fails the first
result is kept with a ``WriteBackWarning`` naming the failure (``write_back="strict"``: a
``WriteBackError``): ``generate`` / ``use_cache=True`` will not work on it. A group the solver does not
move (a hidden size that cannot grow under its norms) pins the groups tied to it at its width
(``fxadapt.planning.uniform.pinned_by_ties``): at 1.5x a tiny RWKV keeps its attention at the hidden size
and grows its MLP.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fxadapt import meta
from fxadapt.checks import verify
from fxadapt.errors import FxAdaptError
from fxadapt.ir.capture import fixed_kwargs
from fxadapt.ir.inputs import Inputs
from fxadapt.planning.uniform import classes
from fxadapt.writeback.probe import failure
from fxadapt.writeback.widths import module_stack

if TYPE_CHECKING:
    from torch.fx import GraphModule

    from fxadapt.pipeline.job import Job

RETRIES = 2
_SIZES = re.compile(r"size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\)")


@dataclass(frozen=True)
class CacheFailure:
    """The cached run failed: ``message`` (the warning's sentence), the two sizes torch's error named where it
    raised (read once from torch's own text: ``_two_sizes``) and the modules running then (``probe``)."""

    message: str
    sizes: tuple[int, int] | None = None
    running: tuple = ()

    def __str__(self) -> str:
        return self.message


def has_cache(model: nn.Module, inputs: Inputs) -> bool:
    """Whether ``model`` generates and its ``forward`` takes ``use_cache`` (that capture turned off)."""
    gen = getattr(model, "can_generate", None)
    generates = gen() if callable(gen) else callable(getattr(model, "generate", None))
    return bool(generates) and "use_cache" in fixed_kwargs(model, inputs)


def cached_failure(model: nn.Module, job: Job) -> CacheFailure | None:
    """How the cached forward fails at the example inputs (``CacheFailure``), or None when it runs and its
    logits match the uncached ones (or the model has no cache)."""
    plain = job.called    # how the original (the same class) is called: built once by capture
    if plain is None or not has_cache(model, job.inputs):
        return None
    cached = dataclasses.replace(plain, kwargs={**plain.kwargs, "use_cache": True})
    was = model.training
    model.eval()
    try:
        out = []
        running, err = failure(model, lambda: out.append(cached.call(model)))
        if err is not None:
            line = str(err).splitlines()[0] if str(err) else ""
            return CacheFailure(f"{type(err).__name__}: {line}", _two_sizes(line), tuple(running or ()))
        ref = verify.outputs(model, plain)
        verify.check_close(_logits(ref), _logits(out[0]), job.cfg, "the cached path (use_cache=True)")
        return None
    except FxAdaptError as e:
        return CacheFailure(str(e))
    finally:
        model.train(was)


def _logits(out):
    """The output's ``logits`` where it has them, else its first tensor."""
    got = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(got, torch.Tensor):
        return got
    return next((t for t in (out if isinstance(out, (tuple, list)) else (out,))
                 if isinstance(t, torch.Tensor)), out)


def cache_tie(job: Job, failed: CacheFailure) -> frozenset[int] | None:
    """The tie for a cached run that raised with two sizes (module docstring), or None."""
    sizes, running = failed.sizes, failed.running
    if sizes is None:
        return None
    a, plan = job.analysis, job.outcome.plan
    width = lambda g: plan.units.get(g.id, g.units) * g.granularity  # noqa: E731
    kind = lambda g: (g.width, g.units, g.granularity)  # noqa: E731
    s, t = sizes
    pairs = [(g, h) for g in a.prunable if width(g) == s for h in a.prunable
             if h.id != g.id and width(h) == t and kind(h) == kind(g)]
    if not pairs:
        return None
    path = running[-1][0] if running else ""
    g, h = max(pairs, key=lambda p: _scope(a.gm, p[0].id, path) + _scope(a.gm, p[1].id, path))
    tie = {g.id, h.id}
    for c in classes(a, [x.id for x in a.prunable]):
        if g.id in c or h.id in c:
            tie |= {x for x in c if kind(a.groups[x]) == kind(g)}
    return frozenset(tie)


def one_width(job: Job, tie: frozenset[int]) -> bool:
    """Whether the plan gives the tied groups one width (a group the solver cannot move keeps its own)."""
    plan, groups = job.outcome.plan, job.analysis.groups
    return len({plan.units.get(g, groups[g].units) * groups[g].granularity for g in tie}) == 1


def _two_sizes(reason: str) -> tuple[int, int] | None:
    """The two sizes torch's shape error names (``tensor a (s) ... tensor b (t)``, else its first two
    ``(n)``): torch raises them as text only."""
    m = _SIZES.search(reason)
    nums = (m.group(1), m.group(2)) if m else re.findall(r"\((\d+)\)", reason)[:2]
    if len(nums) < 2 or nums[0] == nums[1]:
        return None
    return int(nums[0]), int(nums[1])


def _scope(gm: GraphModule, gid: int, path: str) -> int:
    """How many leading module-path parts the deepest scope ``gid`` is traced in shares with ``path``."""
    parts, best = path.split(".") if path else [], 0
    for n in gm.graph.nodes:
        if gid in n.meta.get(meta.GROUP, ()):
            for scope in module_stack(n):
                inner = scope.split(".")
                best = max(best, next((i for i, (x, y) in enumerate(zip(parts, inner)) if x != y),
                                      min(len(parts), len(inner))))
    return best
