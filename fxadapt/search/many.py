"""Many budgets from one DNA search: the supernet is trained once, each budget gets a short gate-only search.

For MAC budgets ``T_1 .. T_k`` of one model (all shrinking, or all growing):

1. **Shared training.** The DNA search (``fxadapt.search.dna.run_search``, the single search's schedule:
   warm-up, alternating weight and gate steps, ``steps`` in all) at the geometric mean budget
   ``T_mid = (prod T_i)^(1/k)`` trains the weights and leaves the gates near ``T_mid``.
2. **Per budget.** From the shared state, ``gate_steps`` architecture-only steps (no weight step; the
   weights get no gradient) minimise ``L_task + lambda * L_budget(E[MACs], T_i)`` on validation batches
   (Adam on the gates, projected after every step; sampled gates at the final temperature), then the gates
   are discretised, rescaled into ``T_i``'s window and the model is materialised from the shared weights,
   exactly as a single search ends (``fxadapt.search.dna.discretize``, ``Supernet.finalize``). The shared
   state (weights, gates, BatchNorm statistics) is restored before the next budget. Budget ``i`` reads the
   validation batches from index ``1e6 (i + 1)`` on: fresh permutations of tensors and datasets; for a
   ``DataLoader`` the batch at that index modulo its length, reached without loading the batches before it
   (``fxadapt.train.data.Batches``), so three budgets read only ``k * gate_steps`` batches more than one.

Cost in forward/backward passes: ``steps * (1 + 1 / arch_every) + k * gate_steps``; with the default
``gate_steps = steps // 8`` three budgets cost about 1.2x one single-budget search.

>>> import torch, fxadapt
>>> from fxadapt.search.dna import SearchConfig
>>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Flatten(),
...                         torch.nn.Linear(32 * 6 * 6, 4))
>>> x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
>>> a = fxadapt.analyze(m, (x[:1],))
>>> cfg = SearchConfig(steps=8, warmup=2, batch_size=16, progress=False)
>>> runs = dna_many(a, [0.5 * a.macs(), 0.75 * a.macs()], (x, y), None, cfg)
>>> [round(sn.analysis.cost.macs(plan.units) / a.macs(), 2) for _, plan, sn, _ in runs]
[0.5, 0.75]
"""

from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING, Any

from fxadapt import dist
from fxadapt.errors import BudgetError
from fxadapt.search.dna import SearchConfig, discretize, effective_warmup, gate_moves, run_search
from fxadapt.search.loop import GateSchedule, gate_search, prepare, teacher_of

if TYPE_CHECKING:

    from fxadapt.analysis.analyze import Analysis


def dna_many(a0: Analysis, targets: list[float], data: Any, val_data: Any, cfg: SearchConfig = SearchConfig(),
             ctx: dist.DistContext | None = None, gate_steps: int | None = None) -> list[tuple]:
    """One DNA supernet for every MAC target in ``targets`` (module docstring): per target
    ``(supernet graph without gates, plan, supernet, history)`` in the order given (the plans refer to the
    supernet's analysis, ``supernet.analysis``)."""
    t0 = time.perf_counter()
    ctx = ctx if ctx is not None else dist.setup()
    base = a0.macs()
    directions = {t > base for t in targets}
    if len(directions) > 1:
        raise BudgetError("budgets for one search must all shrink or all grow the model; got "
                          + ", ".join(f"{t / base:.3f}x" for t in targets) + ": pass them in two calls")
    grow = directions.pop()
    mid = math.exp(sum(math.log(t) for t in targets) / len(targets))
    effective_warmup(cfg)
    sn, train, val = prepare(a0, mid, data, val_data, cfg, ctx)
    teacher = teacher_of(a0, ctx) if cfg.sandwich else None
    shared = run_search(sn, train, val, mid, grow, cfg, ctx, teacher)
    saved = copy.deepcopy(sn.gm.state_dict())
    shared_s = time.perf_counter() - t0
    steps = gate_steps if gate_steps is not None else max(cfg.steps // 8, 1)
    out = []
    for i, target in enumerate(targets):
        t1 = time.perf_counter()
        history = gate_search(sn, val, target, grow, cfg, ctx, GateSchedule(steps, 1_000_000 * (i + 1)))
        units, present = discretize(sn, target, grow, cfg.solve, cfg.discretize_by)
        sn.gm.to("cpu")
        plain, plan = sn.finalize(units, present)
        last = {"seconds": time.perf_counter() - t1, "shared_seconds": shared_s, "shared_budget": mid,
                **gate_moves(sn, units, present)}
        out.append((plain, plan, sn, shared.history + history + [last]))
        sn.gm.load_state_dict(saved)
        sn.gm.to(ctx.device)
    return out
