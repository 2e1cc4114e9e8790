"""Ablation of DNA on the quality protocol's digits task (issue 11, item 2): one SearchConfig change at a time.

Every row follows bench/quality.py's protocol for ``dna`` (quick settings: the cached 30-epoch bases,
``fxadapt.transform`` with BN kept and recalibrated, 8 fine-tune epochs with distillation from the base)
and records, besides the test accuracy before and after the fine-tune and the search seconds, the test
accuracy of the trained supernet at its final (soft) gates and the mean gate entropy at the last step, so
the gap between the supernet that was trained and the network that was discretised is visible.

    python bench/ablation_dna.py --variants a,b --budgets 0.25,0.1 --seeds 0,1,2   # resumable
    python bench/ablation_dna.py --report                       # seeds 0-2 (--seeds selects the rows)

Rows are cached in bench/.cache/ablation_dna.jsonl (delete to start over); the report goes to stdout and
bench/.cache/ablation_dna.md.

Rows a-f and x1 use the DMCP Markov gates (the defaults until g6 won); g-g6 the sampled gates; every DNA
row but x3 searches the grown supernet (1.5x widths, a block slot after every repeatable block; x3, the
model itself, is the default for shrinking budgets now); n0/n1 are FUR rows (compare n1 with n0).

Result, sampled gates (digits, 120 steps, seeds 0-2): Gumbel-top-2 gates started around the uniformly
scaled widths (g6, now the default) lift accuracy before the fine-tune by +52.6 +- 8.0 (0.25x) and
+21.9 +- 6.9 (0.1x) points over the Markov gates and after it by +2.0 +- 3.2 and +3.1 +- 2.0; one-path
Gumbel (g5) +0.7 / +3.0; uniform initial logits (g, g2) and a 4x gate learning rate (g3, g4) do worse.
Searching the model itself instead of the grown supernet (x3) when shrinking: +0.9 / +1.7 points over g6
and 2-3x faster (6 s / 4 s instead of 14 s), so the grown space is kept for growth budgets only.
Cheaper searches cost accuracy: a gate step after every 2nd weight step (x4) -0.8 / -3.8 points against
x3, 80 steps instead of 120 (x5) -1.5 / -4.0, so ``arch_every=1`` and the step count stay.
FUR's Gaussian DropChannel (n1) beats Bernoulli (n0) by +5.4 +- 4.5 (0.25x) and +6.0 +- 16.0 (0.1x)
after the fine-tune and is FUR's default now.

Result, Markov gates (seeds 0-2, extended to 0-7 for a, c2, c4, d, f): no change beats them after the
fine-tune by more than the paired std. Hardening the gates for the last 25%
of the steps (c2/c3) is the only change that clearly lifts the accuracy *before* the fine-tune (0.25x:
+23.9 +- 5.1 points over 8 seeds; 0.1x: +6.8 +- 5.7), at no extra search time. The supernet at its soft
gates is 95.6% (0.25x) but its discretised network about 20%: the Markov gates settle at one value
``c`` ~ 0.6-0.8 for every bin of a group (Adam moves them in lockstep), a geometric ramp of marginals the
network uses as a soft scale; thresholding at 0.5 keeps only ``log 0.5 / log c`` bins (the hard gates in
the supernet itself score 10%). Entropy penalties lower the entropy (0.39 -> 0.11) without closing the gap;
the sandwich rule collapses at 0.1x (-31.9 points); 240 steps train a better supernet (97.1%) but not a
better discretised one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import SETTINGS, load_task  # noqa: E402
from quality_methods import count_macs  # noqa: E402
from quality_tasks import CACHE, converged_epochs, trained_base  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.pipeline import strategies  # noqa: E402
from fxadapt.search.supernet import SupernetConfig  # noqa: E402
from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune  # noqa: E402

STEPS = SETTINGS["quick"]["opts"]["dna_steps"]
FUR_ITERATIONS = SETTINGS["quick"]["opts"]["fur_iterations"]
# what every DNA row starts from: the defaults before this ablation (Markov gates, grown supernet)
MARKOV = {"supernet": SupernetConfig(gates="markov"), "elastic_when_shrinking": True}
VARIANTS = {
    "a": ("Markov gates (the defaults before g6)", {}),
    "b": ("sandwich", {"sandwich": True}),
    "c": ("alpha-entropy 0.5 ramp", {"entropy_weight": 0.5, "entropy_of": "alpha"}),
    "c2": ("alpha-entropy 0.5 + harden last 25%", {"entropy_weight": 0.5, "entropy_of": "alpha", "harden": 0.25}),
    "c3": ("harden last 25%", {"harden": 0.25}),
    "c4": ("alpha-entropy 20 ramp", {"entropy_weight": 20.0, "entropy_of": "alpha"}),
    "c5": ("alpha-entropy 20 + harden last 25%", {"entropy_weight": 20.0, "entropy_of": "alpha", "harden": 0.25}),
    "c6": ("marginal-entropy 20 ramp", {"entropy_weight": 20.0}),
    "c7": ("marginal-entropy 20 + harden last 25%", {"entropy_weight": 20.0, "harden": 0.25}),
    "d": ("240 steps", {"steps": 2 * STEPS}),
    "f": ("discretise by expected units", {"discretize_by": "expected"}),
    "f2": ("expected units + marginal-entropy 20", {"discretize_by": "expected", "entropy_weight": 20.0}),
    "e": ("a_lr 0.01", {"a_lr": 0.01}),
    "e2": ("budget weight 2", {"budget_weight": 2.0}),
    "g": ("Gumbel gates (FBNetV2), uniform init", {"supernet": SupernetConfig(gates="gumbel"), "gate_init": "uniform"}),
    "g2": ("Gumbel-top-2 gates (MSG-DAS), uniform init",
           {"supernet": SupernetConfig(gates="topk"), "gate_init": "uniform"}),
    "g3": ("Gumbel, uniform init, gate lr 0.2",
           {"supernet": SupernetConfig(gates="gumbel"), "a_lr": 0.2, "gate_init": "uniform"}),
    "g4": ("Gumbel-top-2, uniform init, gate lr 0.2",
           {"supernet": SupernetConfig(gates="topk"), "a_lr": 0.2, "gate_init": "uniform"}),
    "g5": ("Gumbel gates, init at the uniformly scaled widths", {"supernet": SupernetConfig(gates="gumbel")}),
    "g6": ("Gumbel-top-2 gates, init at the uniformly scaled widths", {"supernet": SupernetConfig(gates="topk")}),
    "n0": ("FUR (Network Adjustment), Bernoulli DropChannel", {"strategy": "fur", "noise": "bernoulli"}),
    "n1": ("FUR, Gaussian DropChannel as published", {"strategy": "fur", "noise": "gaussian"}),
    "x1": ("no growth in the supernet (expand 1.0)", {"supernet": SupernetConfig(expand=1.0)}),
    "x2": ("Gumbel-top-2 (g6), no growth in the supernet (expand 1.0)",
           {"supernet": SupernetConfig(gates="topk", expand=1.0)}),
    "x3": ("Gumbel-top-2 (g6), no growth, no block slots (the model itself)",
           {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0)}),
    "x4": ("x3 with a gate step after every 2nd weight step",
           {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0), "arch_every": 2}),
    "x5": ("x3 with 80 steps instead of 120",
           {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0), "steps": 80, "warmup": 33}),
}
PATH = os.path.join(CACHE, "ablation_dna.jsonl")


def _config(variant: str, seed: int) -> tuple[str, fxadapt.TransformConfig]:
    """The strategy and config of a row: DNA with Markov gates unless the row names other ones; FUR rows
    (``"strategy": "fur"``) override FurConfig."""
    over = dict(VARIANTS[variant][1])
    if over.get("strategy", "dna") == "dna":
        over = MARKOV | over
    strategy = over.pop("strategy", "dna")
    cfg = fxadapt.TransformConfig(fold_bn=False)
    if strategy == "fur":
        over = dict(iterations=FUR_ITERATIONS, seed=seed, progress=False) | over
        return strategy, dataclasses.replace(cfg, fur=dataclasses.replace(cfg.fur, **over))
    over = dict(steps=STEPS, seed=seed, progress=False) | over
    return strategy, dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, **over))


def run_one(variant: str, base, data, budget: float, seed: int, ft_epochs: int) -> dict:
    strategy, cfg = _config(variant, seed)
    captured = {}
    original = getattr(strategies, strategy)

    def spy(*a, **k):
        out = original(*a, **k)
        captured["sn"], captured["state"] = out[2], out[3]
        return out

    setattr(strategies, strategy, spy)
    x = data["train"][0][:1]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        model = fxadapt.transform(base, budget, (x,), data=data["train"], strategy=strategy, config=cfg,
                                  val_data=data["val"])
    finally:
        setattr(strategies, strategy, original)
    search_s = time.perf_counter() - t0
    sn, hist = captured["sn"], getattr(captured["state"], "history", captured["state"])
    steps = [h for h in hist if "step" in h or "iteration" in h]
    supernet_acc = accuracy(sn.gm, data["test"])
    before = accuracy(model, data["test"])
    t0 = time.perf_counter()
    finetune(model, data["train"], ft_epochs, teacher=copy.deepcopy(base), cfg=FinetuneConfig(seed=seed))
    ft_s = time.perf_counter() - t0
    return {"variant": variant, "budget": budget, "seed": seed, "acc": accuracy(model, data["test"]),
            "acc_before_ft": before, "supernet_acc": supernet_acc, "entropy": steps[-1].get("entropy", float("nan")),
            "marginal_entropy": steps[-1].get("marginal_entropy"),
            "macs_ratio_expected": steps[-1]["macs_ratio"],
            "macs_ratio": count_macs(model, x) / count_macs(base, x), "search_s": search_s, "finetune_s": ft_s}


def load() -> list[dict]:
    if not os.path.exists(PATH):
        return []
    with open(PATH) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return list({(r["variant"], r["budget"], r["seed"]): r for r in rows}.values())


def ok(rows) -> list[dict]:
    return [r for r in rows if "error" not in r]


def _ms(v, scale=100.0, prec=2) -> str:
    if not v:
        return "-"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{scale * statistics.mean(v):.{prec}f} ± {scale * sd:.{prec}f}"


def _me(rs) -> str:
    v = [r["marginal_entropy"] for r in rs if r.get("marginal_entropy") is not None]
    return f"{statistics.mean(v):.3f}" if v else "-"


def report(rows) -> str:
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    head = ("| variant | budget | n | acc before FT | acc after FT | Δ after FT vs (a), paired | Δ before FT vs (a) "
            "| supernet acc (soft gates) | supernet − discretised (before FT) | gate entropy at end (alpha / marginals) | search s |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for b in budgets:
        ref = {r["seed"]: r for r in rows if r["variant"] == "a" and r["budget"] == b}
        for v in VARIANTS:
            rs = sorted((r for r in rows if r["variant"] == v and r["budget"] == b), key=lambda r: r["seed"])
            if not rs:
                continue
            paired = [r["acc"] - ref[r["seed"]]["acc"] for r in rs if r["seed"] in ref]
            paired_b = [r["acc_before_ft"] - ref[r["seed"]]["acc_before_ft"] for r in rs if r["seed"] in ref]
            gap = [r["supernet_acc"] - r["acc_before_ft"] for r in rs]
            out.append(f"| ({v}) {VARIANTS[v][0]} | {b} | {len(rs)} | {_ms([r['acc_before_ft'] for r in rs])} "
                       f"| {_ms([r['acc'] for r in rs])} | {_ms(paired) if v != 'a' else 'ref'} "
                       f"| {_ms(paired_b) if v != 'a' else 'ref'} | {_ms([r['supernet_acc'] for r in rs])} "
                       f"| {_ms(gap)} | {statistics.mean(r['entropy'] for r in rs):.3f} / {_me(rs)} "
                       f"| {statistics.mean(r['search_s'] for r in rs):.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--budgets", default="0.25,0.1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if not args.report:
        st = SETTINGS["quick"]["digits"]
        data = load_task("digits", st["train"])
        epochs, _ = converged_epochs("digits", data, *st["ladder"])
        for seed in (int(s) for s in args.seeds.split(",")):
            base = trained_base("digits", data, epochs, seed)
            for budget in (float(b) for b in args.budgets.split(",")):
                for v in args.variants.split(","):
                    if (v, budget, seed) in {(r["variant"], r["budget"], r["seed"]) for r in load()}:
                        continue
                    try:
                        row = run_one(v, base, data, budget, seed, st["ft"])
                    except Exception as e:  # noqa: BLE001 - a failed transform is a result of the ablation
                        row = {"variant": v, "budget": budget, "seed": seed, "error": f"{type(e).__name__}: {e}"}
                    print(json.dumps(row), flush=True)
                    with open(PATH, "a") as f:
                        f.write(json.dumps(row) + "\n")
    seeds = {int(s) for s in args.seeds.split(",")}
    rows = [r for r in load() if r["seed"] in seeds]
    text = report(ok(rows)) + "".join(f"\n\nfailed: ({r['variant']}) budget {r['budget']} seed {r['seed']}: {r['error']}"
                                      for r in rows if "error" in r)
    name = "ablation_dna.md" if seeds == {0, 1, 2} else f"ablation_dna_s{'-'.join(map(str, sorted(seeds)))}.md"
    with open(os.path.join(CACHE, name), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
