"""Candidates of the quality protocol (see bench/quality.py): each method turns a trained base into a model
at ``budget`` x its MACs; every candidate is then trained with the same recipe (``fxadapt.finetune``,
distillation from the base).

- ``uniform``: every group scaled by one factor (the widths of fxadapt's data-free solve, which is one
  global scale repaired to the MAC window), **weights re-initialised** (seeded), i.e. the same
  architecture narrowed (or widened) uniformly and trained from scratch — it gets ``base + finetune``
  epochs, the whole training the pruned models had (see ``scratch_epochs`` in quality.py).
- ``tp-uniform``: Torch-Pruning ``MagnitudePruner`` with ``MagnitudeImportance(p=1)`` (L1), the same
  ratio in every layer; ``tp-global``: ``MagnitudePruner(global_pruning=True)`` with
  ``GroupMagnitudeImportance(p=2)`` (group L2 norm, mean-normalised, ranked across layers; at most 90%
  of a layer). Both prune at the largest ratio (14-step bisection) whose result meets the MACs target;
  the classifier head is ignored. Global pruning is not monotone near its maximum ratio (at 0.9 it left
  whole layers unpruned here), so when the bisection finds nothing a grid of ratios is scanned.
- ``datafree``, ``dna``, ``fur``: ``fxadapt.transform`` with that strategy (BN kept, BN statistics
  re-estimated on the training data); DNA and FUR with their defaults except ``seed`` (the protocol
  seed), ``progress=False`` and, when given, ``dna_steps`` / ``fur_iterations`` (quick mode);
  ``fur-bernoulli``: FUR with Bernoulli instead of Gaussian DropChannel (the default before the ablation);
  ``dna-markov``: DNA with the DMCP Markov gates (the default before the Gumbel-top-k gates won the
  ablation in bench/ablation_dna.py); ``dna-scratch``: the widths DNA chose, weights re-initialised and
  trained like ``uniform`` (a diagnostic: DNA's allocation against the uniform one with the weight
  inheritance taken out).

MACs are counted independently of fxadapt with ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch
from torch import nn

import fxadapt

SHRINK = ("uniform", "tp-uniform", "tp-global", "datafree", "fur-bernoulli", "fur", "dna-markov", "dna",
          "dna-scratch")
SCRATCH = ("uniform", "dna-scratch")   # weights re-initialised: trained for base + fine-tune epochs
GROW = ("uniform", "datafree", "dna-markov", "dna")
BASELINES = ("uniform", "tp-uniform", "tp-global", "datafree")


def count_macs(model: nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return fc.get_total_flops() / 2


def tp_prune(model: nn.Module, x: torch.Tensor, target: float, global_pruning: bool) -> nn.Module:
    """Torch-Pruning magnitude pruning at the largest ratio (bisection) whose result is within ``target`` MACs."""
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
    if best is None:    # global pruning is not monotone in the ratio near its maximum: scan for the largest fit
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


def _config(seed: int, dna_steps: int | None, fur_iterations: int | None) -> fxadapt.TransformConfig:
    cfg = fxadapt.TransformConfig()
    search = dataclasses.replace(cfg.search, seed=seed, progress=False)
    if dna_steps:
        search = dataclasses.replace(search, steps=dna_steps)
    fur = dataclasses.replace(cfg.fur, seed=seed, progress=False)
    if fur_iterations:
        fur = dataclasses.replace(fur, iterations=fur_iterations)
    return dataclasses.replace(cfg, search=search, fur=fur, fold_bn=False)


def candidate(method: str, base: nn.Module, data: dict, budget: float, seed: int,
              opts: dict) -> tuple[nn.Module, float]:
    """(model at ``budget`` x base MACs, seconds the method took before any training)."""
    x = data["train"][0][:1]
    t0 = time.perf_counter()
    if method.startswith("tp-"):
        model = tp_prune(base, x, budget * count_macs(base, x), global_pruning=method == "tp-global")
    elif method == "uniform":
        model = reinitialise(fxadapt.transform(base, budget, (x,), strategy="datafree"), seed)
    else:
        if method == "dna-scratch":
            model, s = candidate("dna", base, data, budget, seed, opts)
            return reinitialise(model, seed), s
        cfg = _config(seed, opts.get("dna_steps"), opts.get("fur_iterations"))
        if method == "fur-bernoulli":
            cfg = dataclasses.replace(cfg, fur=dataclasses.replace(cfg.fur, noise="bernoulli"))
        if method == "dna-markov":
            cfg = dataclasses.replace(cfg, search=dataclasses.replace(
                cfg.search, supernet=dataclasses.replace(cfg.search.supernet, gates="markov")))
        kw = {"val_data": data["val"]} if method != "datafree" else {}
        model = fxadapt.transform(base, budget, (x,), data=data["train"], strategy=method.split("-")[0],
                                  config=cfg, **kw)
    return model, time.perf_counter() - t0
