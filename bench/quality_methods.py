"""Candidates of the quality protocol (see bench/quality.py): each method turns a trained base into a model
at ``budget`` x its MACs and says how many optimizer steps on weights it took doing so
(``search_steps``); bench/quality.py then fine-tunes every candidate so that all methods get the same number
of weight-update steps after the base.

- ``uniform``: every group scaled by one factor (the widths of fxadapt's data-free solve, one global scale
  repaired to the MAC window), **weights re-initialised** (seeded): the same architecture narrowed (or
  widened) uniformly and trained from scratch for the base's steps plus the protocol's steps after it.
- ``tp-uniform``: Torch-Pruning ``MagnitudePruner`` with ``MagnitudeImportance(p=1)`` (L1), the same
  ratio in every layer; ``tp-global``: ``MagnitudePruner(global_pruning=True)`` with
  ``GroupMagnitudeImportance(p=2)`` (group L2 norm, ranked across layers; at most 90% of a layer). Both
  prune at the largest ratio (14-step bisection) whose result meets the MACs target; the classifier head
  is ignored. Global pruning is not monotone near its maximum ratio, so when the bisection finds nothing a
  grid of ratios is scanned. No weight steps.
- ``datafree``: ``fxadapt.transform(strategy="datafree")`` (BN statistics re-estimated on the training
  data); no weight steps.
- ``dna``, ``fur``: ``fxadapt.transform`` with that strategy (BN kept, BN statistics re-estimated on the
  training data, which is forward passes only); defaults except ``seed``, ``progress=False`` and the
  protocol's search length: DNA ``steps = S`` (every DNA step, warm-up or not, is one SGD step on the
  weights; a gate step after it only moves the gates), FUR ``iterations = I`` and ``train_steps = S / I``
  (FUR trains the weights ``train_steps`` SGD steps per iteration; its FUR measurement is forward only).
  The searches see the training split only (``search_val="train"``: DNA's gate steps and FUR's loss
  probes draw training batches), so no method gets labelled data the others lack; ``search_val="val"``
  hands them the validation split as before issue 15. A task with its own loss (``sr``: L1) passes it, and
  its learning rate, in ``opts`` (``loss_fn``, ``lr``): DNA's ``SearchConfig(loss_fn=..., w_lr=...)`` and
  FUR's ``FurConfig(loss_fn=..., lr=...)``; both searches call ``loss_fn(prediction, target)``.
- ``fur-bernoulli`` / ``dna-markov``: the old defaults (Bernoulli DropChannel; DMCP Markov gates).
- ``dna-scratch``: the widths DNA chose, weights re-initialised and trained like ``uniform`` (the
  "architecture only" diagnostic: DNA's allocation against the uniform one, weight inheritance removed).

MACs are counted independently of fxadapt with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn

import fxadapt
from fxadapt.hw.sim import SimulatedTarget
from fxadapt.train.finetune import FinetuneConfig

# the "-lat" methods (datafree-lat, importance-lat) take Budget(latency=budget) on this synthetic processor:
# latencies that do not depend on the machine's load, so runs on a shared machine are reproducible
SIMULATED = SimulatedTarget(seed=0)
IMPORTANCE = ("importance", "importance-lrr", "importance-oneshot", "importance-taylor", "importance-act",
              "importance-1it",
              "importance-kd5", "importance-lr5", "importance-depth",
              # the default and its ablation (issue 25)
              "importance-ablation", "importance-ablation-depth", "importance-floor", "importance-floor1",
              "importance-hybrid",
              "importance-fisher", "importance-screen-floors", "importance-lat")
SHRINK = ("uniform", "tp-uniform", "tp-global", "datafree", "fur-bernoulli", "fur", "dna-markov", "dna",
          "dna-scratch") + IMPORTANCE
SCRATCH = ("uniform", "dna-scratch")   # weights re-initialised: trained for base + the protocol's steps
SEARCHES = ("fur-bernoulli", "fur", "dna-markov", "dna") + IMPORTANCE   # train weights while searching
GROW = ("uniform", "datafree", "dna-markov", "dna")
BASELINES = ("uniform", "tp-uniform", "tp-global", "datafree")   # the equal-training baselines
# (id(base), budget, seed, config) -> DNA's candidate and seconds, reused by dna-scratch
_SEARCHED: dict = {}


def count_macs(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return fc.get_total_flops() / 2


def tp_prune(model: nn.Module, x: torch.Tensor, target: float, global_pruning: bool) -> nn.Module:
    """Torch-Pruning magnitude pruning at the largest ratio (bisection) whose result is within ``target``
    MACs."""
    import torch_pruning as tp

    def prune(ratio: float) -> nn.Module:
        m = copy.deepcopy(model).eval()
        head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
        imp = (tp.importance.GroupMagnitudeImportance(p=2) if global_pruning
               else tp.importance.MagnitudeImportance(p=1))
        pruner = tp.pruner.MagnitudePruner(m, x, importance=imp, pruning_ratio=ratio, ignored_layers=head,
                                           global_pruning=global_pruning, max_pruning_ratio=0.9)
        pruner.step()
        return m

    lo, hi, best = 0.0, 0.95, None
    for _ in range(14):
        mid = (lo + hi) / 2
        m = prune(mid)
        if count_macs(m, x) <= target:
            best, hi = m, mid
        else:
            lo = mid
    # global pruning is not monotone in the ratio near its maximum: scan for the largest fit
    if best is None:
        fits = [m for r in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9) if count_macs(m := prune(r), x) <= target]
        best = max(fits, key=lambda m: count_macs(m, x)) if fits else None
    if best is None:
        raise RuntimeError(f"Torch-Pruning reached no model within {target:.0f} MACs")
    return best


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Fresh weights (each module's own ``reset_parameters``) and BN statistics, from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return model


def code_revision(method: str) -> dict:
    """What a cached row's hash adds for code changes its config does not show: the importance methods are
    revision 2 since the rounding rule (``fxadapt.search.importance.rounding``: under ``align="auto"`` a
    coarser alignment only while it rounds the allocation) and 3 since ``kind="hybrid"`` ablates only groups
    of heads / experts (``fxadapt.search.scores.exact_groups``); older rows do not match."""
    return {"importance_rev": 3} if method.startswith("importance") and not method.endswith("-lat") else {}


def method_config(method: str, seed: int, opts: dict) -> fxadapt.TransformConfig | dict:
    """Everything that defines ``method``'s candidate (hashed into the cache key by bench/quality.py)."""
    if method.startswith("tp-"):
        return {"method": method, "bisection": 14, "max_pruning_ratio": 0.9,
                "p": 2 if method == "tp-global" else 1}
    cfg = fxadapt.TransformConfig(fold_bn=False)
    if method in ("uniform", "datafree", "datafree-lat"):
        return cfg
    steps, iterations = opts["search_steps"], opts["fur_iterations"]
    search = dataclasses.replace(cfg.search, seed=seed, progress=False, steps=steps)
    fur = dataclasses.replace(cfg.fur, seed=seed, progress=False, iterations=iterations,
                              train_steps=steps // iterations)
    if method == "fur-bernoulli":
        fur = dataclasses.replace(fur, noise="bernoulli")
    if method == "dna-markov":
        search = dataclasses.replace(search, supernet=dataclasses.replace(search.supernet, gates="markov"))
    if method.startswith("importance"):
        return dataclasses.replace(cfg, importance=importance_config(method, seed, steps, opts))
    if opts.get("loss_fn") is not None:   # a task with its own loss and lr (sr): both searches use them
        search = dataclasses.replace(search, loss_fn=opts["loss_fn"], w_lr=opts["lr"])
        fur = dataclasses.replace(fur, loss_fn=opts["loss_fn"], lr=opts["lr"])
    return dataclasses.replace(cfg, search=search, fur=fur)


def importance_config(method: str, seed: int, steps: int, opts: dict) -> fxadapt.ImportanceConfig:
    """``importance``: ``steps`` distillation steps over 3 prune iterations (hybrid scores: exact in groups of
    <= 16 units, Fisher in wider ones; KL to the base, widths only); the variants change one thing:
    ``-fisher`` Fisher scores everywhere (the default before; ``-hybrid`` the default spelled out),
    ``-oneshot`` one prune and no search step (the fine-tune gets all of W), ``-taylor`` / ``-act`` /
    ``-ablation`` the score, ``-1it`` one prune then the steps, ``-kd5``
    half the loss on the labels, ``-lr5`` lr 0.05,
    ``-lrr`` the recovery recipe's lr (opts ``lr``, else fxadapt.finetune's 0.05),
    ``-depth`` blocks scored and removed too, ``-floor`` every
    group kept at >= half its uniformly scaled width (``-floor1``: at it,
    Minitron's homogeneous widths). A task with its own loss (sr) distils by MSE."""
    cfg = fxadapt.ImportanceConfig(seed=seed, steps=steps)
    variant = {"importance-oneshot": dict(iterations=1, steps=0), "importance-taylor": dict(kind="taylor"),
               "importance-act": dict(kind="activation"), "importance-1it": dict(iterations=1),
               "importance-kd5": dict(kd=0.5), "importance-lr5": dict(lr=0.05),
               "importance-lrr": dict(lr=opts.get("lr", FinetuneConfig().lr)),
               "importance-depth": dict(depth=True), "importance-ablation": dict(kind="ablation"),
               "importance-ablation-depth": dict(kind="ablation", depth=True),
               "importance-floor": dict(floor=0.5), "importance-floor1": dict(floor=1.0),
               "importance-hybrid": dict(kind="hybrid"),
               "importance-fisher": dict(kind="fisher"),
               "importance-screen-floors": dict(screen=3, floors=(0.5, 1.0))}.get(method, {})
    if opts.get("loss_fn") is not None:
        variant = variant | dict(loss="mse", loss_fn=opts["loss_fn"])
    return dataclasses.replace(cfg, **variant)


def weight_steps_of(method: str, model: nn.Module, cfg) -> int:
    """Optimizer steps on weights the search took, read from its history (one DNA entry per weight step;
    one FUR entry per iteration of ``train_steps`` weight steps)."""
    if method not in SEARCHES and method != "dna-scratch":
        return 0
    history = fxadapt.report(model).history
    if method.startswith("fur"):
        return cfg.fur.train_steps * sum(1 for h in history if isinstance(h, dict) and "iteration" in h)
    return sum(1 for h in history if isinstance(h, dict) and "step" in h)


def candidate(method: str, base: nn.Module, data: dict, budget: float, seed: int,
              opts: dict) -> tuple[nn.Module, float, int]:
    """(model at ``budget`` x base MACs, seconds the method took before any training, weight steps taken)."""
    x = data["train"][0][:1]
    t0 = time.perf_counter()
    if method.startswith("tp-"):
        model = tp_prune(base, x, budget * count_macs(base, x), global_pruning=method == "tp-global")
        return model, time.perf_counter() - t0, 0
    if method == "uniform":
        return reinitialise(fxadapt.transform(base, budget, (x,), strategy="datafree"), seed), 0.0, 0
    if method == "dna-scratch":   # DNA's widths; its weight steps are discarded with its weights
        model, s, _ = candidate("dna", base, data, budget, seed, opts)
        return reinitialise(model, seed), s, 0
    cfg = method_config(method, seed, opts)
    key = (id(base), budget, seed, repr(cfg))
    if method == "dna" and key in _SEARCHED:
        model, s, steps = _SEARCHED[key]
        return copy.deepcopy(model), s, steps
    kw = {"val_data": data["val"]} if opts.get("search_val") == "val" and method != "datafree" else {}
    goal = fxadapt.Budget(latency=budget, target=SIMULATED) if method.endswith("-lat") else budget
    model = fxadapt.transform(base, goal, (x,), data=data["train"], strategy=method.split("-")[0],
                              config=cfg, **kw)
    out = (model, time.perf_counter() - t0, weight_steps_of(method, model, cfg))
    if method == "dna":
        _SEARCHED.clear()
        _SEARCHED[key] = (copy.deepcopy(model), out[1], out[2])
    return out
