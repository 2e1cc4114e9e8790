"""Ablation of DNA on the quality protocol's digits task (issue 11, item 2): one SearchConfig change at a
time.

Every row follows bench/quality.py's fair protocol for ``dna`` (quick settings: the cached bases,
``fxadapt.transform`` with BN kept and recalibrated, the search on the training split only, then a
fine-tune with distillation from the base long enough that every row gets the protocol's W = 240 weight
steps after the base: a row whose search takes more or fewer weight steps is fine-tuned correspondingly
fewer or more epochs). It records, besides the **validation** accuracy before and after the fine-tune and
the search seconds, the validation accuracy of the trained supernet at its final (soft) gates and the mean
gate entropy at the last step. The test split is removed from the data before anything runs: ablation
choices are made on validation accuracy only (issue 15).

    python bench/ablation_dna.py --variants a,b --budgets 0.25,0.1 --seeds 0,1,2   # resumable
    python bench/ablation_dna.py --report                       # seeds 0-2 (--seeds selects the rows)

Rows are cached in bench/.cache/ablation_dna.jsonl keyed by (variant, budget, seed, config hash: every option
of the row's TransformConfig, the fine-tune recipe, the base epochs and ``quality.PROTOCOL``); rows of an
older protocol or config are ignored. The report goes to stdout and bench/.cache/ablation_dna.md.

Rows a-f and x1 use the DMCP Markov gates; g-g6 the sampled gates; every DNA row but x3-x5 searches the
grown supernet (1.5x widths, a block slot after every repeatable block; x3, the model itself, is the
default for shrinking budgets); n0/n1 are FUR rows (compare n1 with n0).

Re-measured on val so far (seeds 0-2, README "Quality"): x3 (the default) against (a) +4.00 +- 3.61 (0.25x)
and +5.11 +- 21.12 (0.1x), g6 +2.89 +- 4.78 / +5.11 +- 18.41. The other rows are not yet re-measured under
this protocol. The results that chose today's defaults (Gumbel-top-2 gates
started around the uniformly scaled widths, g6; the model itself as the search space when shrinking, x3;
``arch_every=1`` and 120 steps over x4 / x5; FUR's Gaussian DropChannel, n1 over n0) were measured before
issue 15 on the **test** split of the same bases and seeds bench/quality.py reports, with the searches
reading the validation split and with unequal weight steps (x5's 80 steps were not compensated). They are
kept in the git history of this file; until the rows are re-run here on validation accuracy, those
defaults count as chosen on the reported test split.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality  # noqa: E402
from quality import SETTINGS, load_task, stable, steps_per_epoch  # noqa: E402
from quality_methods import count_macs, weight_steps_of  # noqa: E402
from quality_tasks import CACHE, DIGITS_SPLIT, converged_epochs, trained_base  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.pipeline import strategies  # noqa: E402
from fxadapt.search.supernet import SupernetConfig  # noqa: E402
from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune  # noqa: E402

QUICK = SETTINGS["quick"]["digits"]
STEPS = QUICK["search"] * (DIGITS_SPLIT[0] // quality.BATCH)   # the protocol's search steps S * spe (120)
FUR_ITERATIONS = SETTINGS["quick"]["fur_iterations"]
# what every DNA row starts from: the defaults before this ablation (Markov gates, grown supernet)
MARKOV = {"supernet": SupernetConfig(gates="markov"), "elastic_when_shrinking": True}
VARIANTS = {
    "a": ("Markov gates (the defaults before g6)", {}),
    "b": ("sandwich", {"sandwich": True}),
    "c": ("alpha-entropy 0.5 ramp", {"entropy_weight": 0.5, "entropy_of": "alpha"}),
    "c2": ("alpha-entropy 0.5 + harden last 25%",
           {"entropy_weight": 0.5, "entropy_of": "alpha", "harden": 0.25}),
    "c3": ("harden last 25%", {"harden": 0.25}),
    "c4": ("alpha-entropy 20 ramp", {"entropy_weight": 20.0, "entropy_of": "alpha"}),
    "c5": ("alpha-entropy 20 + harden last 25%",
           {"entropy_weight": 20.0, "entropy_of": "alpha", "harden": 0.25}),
    "c6": ("marginal-entropy 20 ramp", {"entropy_weight": 20.0}),
    "c7": ("marginal-entropy 20 + harden last 25%", {"entropy_weight": 20.0, "harden": 0.25}),
    "d": ("240 steps", {"steps": 2 * STEPS}),
    "f": ("discretise by expected units", {"discretize_by": "expected"}),
    "f2": ("expected units + marginal-entropy 20", {"discretize_by": "expected", "entropy_weight": 20.0}),
    "e": ("a_lr 0.01", {"a_lr": 0.01}),
    "e2": ("budget weight 2", {"budget_weight": 2.0}),
    "g": ("Gumbel gates (FBNetV2), uniform init",
          {"supernet": SupernetConfig(gates="gumbel"), "gate_init": "uniform"}),
    "g2": ("Gumbel-top-2 gates (MSG-DAS), uniform init",
           {"supernet": SupernetConfig(gates="topk"), "gate_init": "uniform"}),
    "g3": ("Gumbel, uniform init, gate lr 0.2",
           {"supernet": SupernetConfig(gates="gumbel"), "a_lr": 0.2, "gate_init": "uniform"}),
    "g4": ("Gumbel-top-2, uniform init, gate lr 0.2",
           {"supernet": SupernetConfig(gates="topk"), "a_lr": 0.2, "gate_init": "uniform"}),
    "g5": ("Gumbel gates, init at the uniformly scaled widths", {"supernet": SupernetConfig(gates="gumbel")}),
    "g6": ("Gumbel-top-2 gates, init at the uniformly scaled widths",
           {"supernet": SupernetConfig(gates="topk")}),
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
    "w0": ("x3, gates only on the inherited weights: 120 gate steps, no weight step (W all to the fine-tune)",
           {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0), "weights": "frozen"}),
    "w1": ("x3, gates only, 40 gate steps",
           {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0), "weights": "frozen",
            "steps": 40}),
    "w2": ("x3, gates only, 120 gate steps, gate lr 0.2",
           {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0), "weights": "frozen",
            "a_lr": 0.2}),
    "df": ("fxadapt data-free widths (no search; W all to the fine-tune)", {"strategy": "datafree"}),
    "m3": ("Markov gates on the model itself (x3 with gates='markov')",
           {"supernet": SupernetConfig(gates="markov", expand=1.0, depth_slots=0)}),
    "h5": ("x3, gate steps on a held-out half of the training split (DARTS)",
           {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0), "holdout": 0.5}),
    "h2": ("x3, gate steps on a held-out 20% of the training split",
           {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0), "holdout": 0.2}),
    "df2": ("data-free, fine-tune lr 0.1", {"strategy": "datafree", "ft": {"lr": 0.1}}),
    "df3": ("data-free, fine-tune lr 0.2", {"strategy": "datafree", "ft": {"lr": 0.2}}),
    "x3k": ("x3, fine-tune lr 0.1", {"supernet": SupernetConfig(gates="topk", expand=1.0, depth_slots=0),
                                     "ft": {"lr": 0.1}}),
}
PATH = os.path.join(CACHE, "ablation_dna.jsonl")


def _config(variant: str, seed: int) -> tuple[str, fxadapt.TransformConfig]:
    """The strategy and config of a row: DNA with Markov gates unless the row names other ones; FUR rows
    (``"strategy": "fur"``) override FurConfig."""
    over = {k: v for k, v in VARIANTS[variant][1].items() if k != "ft"}
    if over.get("strategy", "dna") == "dna":
        over = MARKOV | over
    strategy = over.pop("strategy", "dna")
    cfg = fxadapt.TransformConfig(fold_bn=False)
    if strategy == "datafree":
        return strategy, cfg
    if strategy == "fur":
        over = dict(iterations=FUR_ITERATIONS, train_steps=STEPS // FUR_ITERATIONS, seed=seed,
                    progress=False) | over
        return strategy, dataclasses.replace(cfg, fur=dataclasses.replace(cfg.fur, **over))
    over = dict(steps=STEPS, seed=seed, progress=False) | over
    return strategy, dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, **over))


def ft_config(variant: str, seed: int) -> FinetuneConfig:
    """The fine-tune of a row: the protocol's recipe, with the row's ``"ft"`` overrides (a recipe row)."""
    return FinetuneConfig(seed=seed, **VARIANTS[variant][1].get("ft", {}))


def config_hash(variant: str, base_epochs: int, search_val: str) -> str:
    strategy, cfg = _config(variant, 0)
    payload = {"protocol": quality.PROTOCOL, "settings": QUICK, "base_epochs": base_epochs,
               "strategy": strategy, "config": stable(cfg), "finetune": stable(ft_config(variant, 0)),
               "search_val": search_val}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _search(variant: str, base, data, budget: float, seed: int, search_val: str):
    """The transformed model, the supernet and history the strategy left, the seconds and the config."""
    strategy, cfg = _config(variant, seed)
    captured = {}
    original = getattr(strategies, strategy)

    def spy(*a, **k):
        out = original(*a, **k)
        captured["sn"], captured["state"] = out[2], out[3]
        return out

    if strategy != "datafree":   # its outcome has no supernet
        setattr(strategies, strategy, spy)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    kw = {"val_data": data["val"]} if search_val == "val" else {}
    try:
        model = fxadapt.transform(base, budget, (data["train"][0][:1],), data=data["train"],
                                  strategy=strategy, config=cfg, **kw)
    finally:
        setattr(strategies, strategy, original)
    return model, captured, time.perf_counter() - t0, strategy, cfg


def run_one(variant: str, base, data, budget: float, seed: int, base_epochs: int, search_val: str) -> dict:
    """One row on the validation split (``data`` has no test split)."""
    model, captured, search_s, strategy, cfg = _search(variant, base, data, budget, seed, search_val)
    sn, hist = captured.get("sn"), getattr(captured.get("state"), "history", captured.get("state")) or []
    steps = [h for h in hist if "step" in h or "gate_step" in h or "iteration" in h] or [{}]
    spe = steps_per_epoch(data)
    search_steps = weight_steps_of(strategy, model, cfg)
    epochs = QUICK["ft"] + QUICK["search"] - round(search_steps / spe)   # W weight steps after the base
    supernet_acc = accuracy(sn.gm, data["val"]) if sn is not None else float("nan")
    before = accuracy(model, data["val"])
    t0 = time.perf_counter()
    if epochs > 0:
        finetune(model, data["train"], epochs, teacher=copy.deepcopy(base), cfg=ft_config(variant, seed))
    ft_s, x = time.perf_counter() - t0, data["train"][0][:1]
    return {"variant": variant, "budget": budget, "seed": seed,
            "config_hash": config_hash(variant, base_epochs, search_val),
            "val_acc": accuracy(model, data["val"]), "val_before_ft": before,
            "supernet_val_acc": supernet_acc, "entropy": steps[-1].get("entropy", float("nan")),
            "marginal_entropy": steps[-1].get("marginal_entropy"),
            "macs_ratio_expected": steps[-1].get("macs_ratio", float("nan")),
            "macs_ratio": count_macs(model, x) / count_macs(base, x), "search_s": search_s,
            "finetune_s": ft_s, "search_steps": search_steps, "finetune_steps": epochs * spe}


def load(hashes: dict[str, str]) -> list[dict]:
    """Rows whose config hash is the current one for their variant (others are stale)."""
    if not os.path.exists(PATH):
        return []
    with open(PATH) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("config_hash") == hashes.get(r["variant"])]
    return list({(r["variant"], r["budget"], r["seed"]): r for r in rows}.values())


def ok(rows) -> list[dict]:
    return [r for r in rows if "error" not in r]


def _ci(v) -> str:
    if any(x != x for x in v):   # NaN: the row has no such number (data-free has no supernet)
        return "-"
    m, h = quality.interval(v)
    return f"{100 * m:.2f} ± {100 * h:.2f}"


def _me(rs) -> str:
    v = [r["marginal_entropy"] for r in rs if r.get("marginal_entropy") is not None]
    return f"{statistics.mean(v):.3f}" if v else "-"


def report(rows, ref: str = "x3") -> str:
    """Validation accuracy (%), mean ± 95% t-interval; paired differences against row ``ref`` (the
    default)."""
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    head = ("| variant | budget | n | weight steps (search + FT) | val before FT | val after FT "
            f"| Δ after FT vs ({ref}), paired | Δ before FT vs ({ref}) | supernet val (soft gates) "
            "| supernet − discretised (before FT) | gate entropy at end (alpha / marginals) | search s |")
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for b in budgets:
        by_seed = {r["seed"]: r for r in rows if r["variant"] == ref and r["budget"] == b}
        for v in VARIANTS:
            rs = sorted((r for r in rows if r["variant"] == v and r["budget"] == b), key=lambda r: r["seed"])
            if not rs:
                continue
            paired = [r["val_acc"] - by_seed[r["seed"]]["val_acc"] for r in rs if r["seed"] in by_seed]
            paired_b = [r["val_before_ft"] - by_seed[r["seed"]]["val_before_ft"] for r in rs
                        if r["seed"] in by_seed]
            gap = [r["supernet_val_acc"] - r["val_before_ft"] for r in rs]
            steps = ", ".join(sorted({f"{r['search_steps']} + {r['finetune_steps']}" for r in rs}))
            out.append(f"| ({v}) {VARIANTS[v][0]} | {b} | {len(rs)} | {steps} | "
                       f"{_ci([r['val_before_ft'] for r in rs])} | {_ci([r['val_acc'] for r in rs])} | "
                       f"{_ci(paired) if v != ref and paired else 'ref'} | "
                       f"{_ci(paired_b) if v != ref and paired_b else 'ref'} | "
                       f"{_ci([r['supernet_val_acc'] for r in rs])} | {_ci(gap)} | "
                       f"{statistics.mean(r['entropy'] for r in rs):.3f} / {_me(rs)} | "
                       f"{statistics.mean(r['search_s'] for r in rs):.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--budgets", default="0.25,0.1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--search-val", choices=("train", "val"), default="train")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true")
    p.add_argument("--ref", default="x3", help="the row every paired difference is taken against")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    data = {k: v for k, v in load_task("digits", QUICK["train"]).items() if k != "test"}   # never read here
    epochs, _ = converged_epochs("digits", data, *QUICK["ladder"])
    hashes = {v: config_hash(v, epochs, args.search_val) for v in VARIANTS}
    if not args.report:
        for seed in (int(s) for s in args.seeds.split(",")):
            base = trained_base("digits", data, epochs, seed)
            for budget in (float(b) for b in args.budgets.split(",")):
                for v in args.variants.split(","):
                    if (v, budget, seed) in {(r["variant"], r["budget"], r["seed"]) for r in load(hashes)}:
                        continue
                    try:
                        row = run_one(v, base, data, budget, seed, epochs, args.search_val)
                    except Exception as e:  # noqa: BLE001 - a failed transform is a result of the ablation
                        row = {"variant": v, "budget": budget, "seed": seed, "config_hash": hashes[v],
                               "error": f"{type(e).__name__}: {e}"}
                    row |= quality.provenance()
                    print(json.dumps(row), flush=True)
                    with open(PATH, "a") as f:
                        f.write(json.dumps(row) + "\n")
    seeds = {int(s) for s in args.seeds.split(",")}
    rows = [r for r in load(hashes) if r["seed"] in seeds]
    text = report(ok(rows),
                  args.ref) + "".join(f"\n\nfailed: ({r['variant']}) budget {r['budget']} seed {r['seed']}: "
                                      f"{r['error']}"
                                      for r in rows if "error" in r)
    name = "ablation_dna.md" if seeds == {0, 1, 2} \
            else f"ablation_dna_s{'-'.join(map(str, sorted(seeds)))}.md"
    with open(os.path.join(CACHE, name), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
