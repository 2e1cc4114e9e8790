"""Quality benchmark on scikit-learn's digits: fxadapt (data-free, FUR, DNA) vs uniform scaling and
Torch-Pruning at equal MACs, with the same fine-tuning for every candidate.

Run:  python bench/quality_digits.py            (full: budgets 0.25, 0.5, 2.0; seeds 0, 1, 2)
      python bench/quality_digits.py --quick    (one seed, fewer epochs: a smoke run)

Protocol: see bench/digits_setup.py (500 train / 300 val / 997 test, noise sigma 1.0, ResNet-20). Every
candidate is fine-tuned with ``fxadapt.finetune`` for ``--epochs`` epochs (SGD, cosine, distillation from
the base model at T=4, weight 0.5) and scored on the test split. Prints a methods x budgets table of
test accuracy (mean +- std over seeds), the measured MACs ratio, search time as a multiple of one
fine-tuning run, and the peak saved-activation memory of a gated (supernet) training step vs a plain one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from digits_setup import BASE_EPOCHS, base_model, digits_data, tp_prune, uniform_scaled  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune  # noqa: E402
from fxadapt.search.fur import FurConfig  # noqa: E402
from fxadapt.search.dna import SearchConfig  # noqa: E402
from fxadapt.search.supernet import SupernetConfig, build_supernet  # noqa: E402
from fxadapt.analysis.count import count_macs  # noqa: E402
from fxadapt.pipeline.transform import TransformConfig  # noqa: E402

CACHE = os.path.join(os.path.dirname(__file__), ".cache")
SHRINK = ["uniform", "tp-uniform", "tp-global", "datafree", "fur", "dna"]
GROW = ["uniform", "datafree", "fur", "dna"]


def trained_base(data, epochs: int) -> torch.nn.Module:
    path = os.path.join(CACHE, f"resnet20_digits_e{epochs}.pt")
    model = base_model()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    finetune(model, data["train"], epochs, cfg=FinetuneConfig(lr=0.1, kd=0.0))
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def candidate(method: str, base, data, budget: float, seed: int, search_steps: int):
    x = data["train"][0][:1]
    target = budget * count_macs(base, (x,))
    if method == "uniform":
        return uniform_scaled(base, x, budget)
    if method.startswith("tp-"):
        return tp_prune(base, x, target, global_pruning=method == "tp-global")
    expand = 1.75 if budget > 1 else 1.25
    sn = SupernetConfig(expand=expand, depth_slots=1 if budget > 1 else 0)
    cfg = TransformConfig(
        fold_bn=False,
        search=SearchConfig(steps=search_steps, warmup=search_steps // 4, seed=seed, progress=False, supernet=sn),
        fur=FurConfig(iterations=3, train_steps=max(4, search_steps // 6), draws=2, val_samples=200, seed=seed,
                      supernet=SupernetConfig(expand=expand, depth_slots=0)))
    strategy = "datafree" if method == "datafree" else method
    kw = {} if strategy == "datafree" else {"data": data["train"], "val_data": data["val"]}
    return fxadapt.transform(base, budget, (x,), strategy=strategy, config=cfg, **kw)


def run_one(method, base, data, budget, seed, epochs, search_steps) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = candidate(method, base, data, budget, seed, search_steps)
    t_search = time.perf_counter() - t0
    x = data["train"][0][:1]
    ratio = count_macs(model, (x,)) / count_macs(base, (x,))
    t1 = time.perf_counter()
    finetune(model, data["train"], epochs, teacher=copy.deepcopy(base), cfg=FinetuneConfig(seed=seed))
    t_ft = time.perf_counter() - t1
    return {"method": method, "budget": budget, "seed": seed, "acc": accuracy(model, data["test"]),
            "macs_ratio": ratio, "search_s": t_search, "finetune_s": t_ft}


def saved_bytes(model, x, y) -> int:
    """Bytes of tensors saved for backward in one training step (the activation memory of the step)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return total + sum(p.numel() * p.element_size() * 3 for p in model.parameters())  # weights, grads, momentum


def memory_ratio(base, data) -> float:
    x, y = data["train"][0][:64], data["train"][1][:64]
    sn = build_supernet(fxadapt.analyze(base, (x[:1],)), None, SupernetConfig(expand=1.0, depth_slots=0))
    plain = fxadapt.capture(base, (x[:1],))
    return saved_bytes(sn.gm, x, y) / saved_bytes(plain, x, y)


def summarize(rows: list[dict], base_acc: float) -> str:
    lines = [f"base ResNet-20: test accuracy {base_acc:.4f}", "",
             f"{'method':<12} {'budget':>6} {'acc mean':>9} {'std':>7} {'MACs x':>7} {'search/ft':>9} n"]
    keys = sorted({(r["budget"], r["method"]) for r in rows}, key=lambda k: (k[0], (SHRINK + GROW).index(k[1])))
    for budget, method in keys:
        rs = [r for r in rows if r["budget"] == budget and r["method"] == method]
        accs = [r["acc"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        sft = statistics.mean(r["search_s"] / r["finetune_s"] for r in rs)
        lines.append(f"{method:<12} {budget:>6} {statistics.mean(accs):>9.4f} {sd:>7.4f} "
                     f"{statistics.mean(r['macs_ratio'] for r in rs):>7.3f} {sft:>9.2f} {len(rs)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--search-steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budgets", default="0.25,0.5,2.0")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="")
    p.add_argument("--out", default=os.path.join(CACHE, "quality_digits.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    epochs = 3 if args.quick else args.epochs
    data = digits_data()
    base = trained_base(data, 5 if args.quick else BASE_EPOCHS)
    base_acc = accuracy(base, data["test"])
    print(f"base test accuracy {base_acc:.4f}; gated/plain step memory {memory_ratio(base, data):.3f}", flush=True)
    if args.budgets == "none":
        return 0
    rows = []
    for budget in [float(b) for b in args.budgets.split(",") if b]:
        methods = GROW if budget > 1 else SHRINK
        for method in [m for m in methods if not args.methods or m in args.methods.split(",")]:
            for seed in seeds:
                r = run_one(method, base, data, budget, seed, epochs, 24 if args.quick else args.search_steps)
                rows.append(r)
                print(json.dumps(r), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"base_acc": base_acc, "rows": rows}, f, indent=1)
    print(summarize(rows, base_acc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
