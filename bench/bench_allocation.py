"""Where the allocation of width matters (issue 15, item 2): two sensors of one scene, one of them poor.

On the protocol's tasks (bench/quality.py) a searched allocation trained from scratch ties the uniform one,
so no search can win by its architecture there. This bench builds the case the searches exist for: a
model whose budget is best spent unevenly, and asks which method finds that, under the same fair rules
(equal weight-update steps after the base, 5 seeds, paired 95% t-intervals, no choice made on test).

Task ``fusion`` (generated, nothing downloaded): every example is one ``shapes`` scene (bench/quality_tasks,
10 classes) seen by two sensors. Stream ``a`` is the 16x16 image; stream ``b`` is the same scene through a
poor sensor: average-pooled to 4x4, upsampled back and buried in Gaussian noise (sigma ``NOISE_B``);
``--sensor dead``: the second stream is that noise alone (a failed sensor the model cannot tell). 3000
train / 1000 val / 2000 test scenes. Model ``TwoSensor``: per stream ``conv3x3(3, w) - conv3x3(w, 2w,
stride 2) - conv3x3(2w, 2w)`` (BN, ReLU) and global average pooling; the concatenated features feed a
linear classifier. Both streams cost the same MACs per unit, so data-free scaling (one global factor)
keeps them equal; moving units from ``b`` to ``a`` keeps the MACs.

Protocol (as bench/quality.py's, with fixed epochs: no choice to make): base ``E`` epochs from scratch;
after it every method gets ``W = (F + S) * spe`` weight steps. ``uniform`` and every ``*-scratch`` row
(the method's widths, fresh weights) train ``E`` epochs + W steps; data-free is fine-tuned W; DNA
searches ``S * spe`` steps (each a weight step) and is fine-tuned ``F`` epochs; FUR trains its 2
iterations of ``S * spe / 2`` steps, then ``F`` epochs. Every training after the base distils from it
(``fxadapt.finetune``, the protocol's recipe). The table reports test accuracy and the units each stream
kept (read from the returned modules' conv shapes).

    python bench/bench_allocation.py [--sensor poor|dead] [--seeds 0,1,2,3,4] [--budgets 0.1]   # cached,
    resumable
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import interval  # noqa: E402
from quality_methods import reinitialise, weight_steps_of  # noqa: E402
from quality_tasks import CACHE, _shapes, _standardise  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.analysis.count import count_macs  # noqa: E402
from fxadapt.search.supernet import SupernetConfig  # noqa: E402
from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune  # noqa: E402

NOISE_B, SPLIT, WIDTH = 1.0, (3000, 1000, 2000), 16
SENSORS = ("poor", "dead")
E, F_EPOCHS, S_EPOCHS = 24, 4, 3
METHODS = ("uniform", "datafree", "dna", "dna-scratch", "dna-markov", "dna-markov-scratch", "fur",
           "fur-scratch")
PATH = os.path.join(CACHE, "allocation.jsonl")
VERSION = "alloc-v1"   # with the sensor: "alloc-v1" (poor), "alloc-v1-dead"


def fusion_task(sensor: str = "poor") -> dict:
    """``{split: (x [N, 6, 16, 16], y)}``: channels 0-2 the clean sensor, 3-5 the poor one (``"dead"``: noise
    alone, no view of the scene)."""
    g = torch.Generator().manual_seed(4321)
    parts = {}
    for k, n in zip(("train", "val", "test"), SPLIT):
        a, y = _shapes(n, g)
        seen = F.interpolate(F.avg_pool2d(a, 4), size=16, mode="nearest") if sensor == "poor" else 0.0
        b = seen + NOISE_B * torch.randn(a.shape, generator=g)
        parts[k] = (torch.cat([a, b], 1), y)
    return _standardise(parts)


class Stream(nn.Sequential):
    def __init__(self, w: int):
        def cbr(i, o, s):
            return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
        super().__init__(*cbr(3, w, 1), *cbr(w, 2 * w, 2), *cbr(2 * w, 2 * w, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


class TwoSensor(nn.Module):
    """``fc(cat(a(x[:, :3]), b(x[:, 3:])))``."""

    def __init__(self, w: int = WIDTH, classes: int = 10):
        super().__init__()
        self.a, self.b = Stream(w), Stream(w)
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x[:, :3]), self.b(x[:, 3:])], 1))


def units(model: nn.Module) -> str:
    """Output channels of each stream's convolutions, ``a | b``."""
    def of(s):
        return "/".join(str(m.out_channels) for m in s.modules() if isinstance(m, nn.Conv2d))
    return f"{of(model.a)} | {of(model.b)}"


def base(data: dict, seed: int, version: str = VERSION) -> nn.Module:
    path = os.path.join(CACHE, f"alloc_base_{version}_e{E}_s{seed}.pt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TwoSensor()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    finetune(model, data["train"], E, cfg=FinetuneConfig(kd=0.0, seed=seed))
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def _config(method: str, seed: int, steps: int) -> fxadapt.TransformConfig:
    cfg = fxadapt.TransformConfig(fold_bn=False)
    search = dataclasses.replace(cfg.search, seed=seed, progress=False, steps=steps)
    if "markov" in method:
        search = dataclasses.replace(search, supernet=SupernetConfig(gates="markov"))
    if "-h" in method:   # dna-h50: gate steps on a held-out 50% of the training split
        search = dataclasses.replace(search, holdout=int(method.split("-h")[1].split("-")[0]) / 100)
    fur = dataclasses.replace(cfg.fur, seed=seed, progress=False, iterations=2, train_steps=steps // 2)
    return dataclasses.replace(cfg, search=search, fur=fur)


def candidate(method: str, b: nn.Module, data: dict, budget: float, seed: int, spe: int):
    """``(model, search seconds, search weight steps)`` before any training after the base."""
    x = data["train"][0][:1]
    name = method.removesuffix("-scratch")
    t0 = time.perf_counter()
    if name in ("uniform", "datafree"):
        model = fxadapt.transform(b, budget, (x,), strategy="datafree")
    else:
        cfg = _config(name, seed, S_EPOCHS * spe)
        model = fxadapt.transform(b, budget, (x,), data=data["train"], strategy=name.split("-")[0],
                                  config=cfg)
    s = time.perf_counter() - t0
    if method == "uniform" or method.endswith("-scratch"):
        return reinitialise(model, seed), s, 0
    return model, s, weight_steps_of(name.split("-")[0], model, _config(name, seed, S_EPOCHS * spe))


def run_row(method: str, b: nn.Module, data: dict, budget: float, seed: int, version: str) -> dict:
    spe = len(data["train"][1]) // 64
    torch.manual_seed(seed)
    model, search_s, search_steps = candidate(method, b, data, budget, seed, spe)
    scratch = method == "uniform" or method.endswith("-scratch")
    w = (F_EPOCHS + S_EPOCHS) * spe
    steps = E * spe + w if scratch else w - search_steps
    epochs = max(round(steps / spe), 0)
    t0 = time.perf_counter()
    if epochs:
        finetune(model, data["train"], epochs, teacher=copy.deepcopy(b), cfg=FinetuneConfig(seed=seed))
    x = data["train"][0][:1]
    return {"method": method, "budget": budget, "seed": seed, "version": version,
            "acc": accuracy(model, data["test"]), "val_acc": accuracy(model, data["val"]),
            "units": units(model), "search_s": search_s, "finetune_s": time.perf_counter() - t0,
            "search_steps": search_steps, "finetune_steps": epochs * spe,
            "macs_ratio": count_macs(model, x) / count_macs(b, x)}


def _ci(v) -> str:
    m, h = interval(v)
    return f"{100 * m:.2f} ± {100 * h:.2f}"


def report(rows: list[dict], seeds) -> str:
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    cell = {(r["method"], r["budget"], r["seed"]): r for r in rows if r["seed"] in seeds}
    out = ["| method | weight steps (search + FT) | " + " | ".join(f"{b}x test % | {b}x − uniform, paired | "
                                                           f"{b}x units a / b (seed 0)" for b in budgets)
                                                           + " |",
           "|---" * (2 + 3 * len(budgets)) + "|"]
    for m in (m for m in METHODS if any(k[0] == m for k in cell)):
        parts, steps = [], set()
        for b in budgets:
            rs = [cell[(m, b, s)] for s in seeds if (m, b, s) in cell]
            ref = [cell[("uniform", b, r["seed"])] for r in rs if ("uniform", b, r["seed"]) in cell]
            steps |= {f"{r['search_steps']} + {r['finetune_steps']}" for r in rs}
            diff = _ci([r["acc"] - u["acc"] for r, u in zip(rs, ref)]) if m != "uniform" and len(ref) > 1 \
                    else "ref"
            u0 = cell.get((m, b, min(seeds)), {}).get("units", "-")
            parts.append(f"{_ci([r['acc'] for r in rs]) if len(rs) > 1 else '-'} | {diff} | {u0}")
        out.append(f"| {m} | {', '.join(sorted(steps))} | " + " | ".join(parts) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--budgets", default="0.1")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sensor", choices=SENSORS, default="poor")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    version = VERSION + ("" if args.sensor == "poor" else f"-{args.sensor}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = load(version)
    if not args.report:
        data = fusion_task(args.sensor)
        for seed in seeds:
            b = base(data, seed, version)
            print(f"[base] seed {seed}: test {accuracy(b, data['test']):.4f}", flush=True)
            for budget in (float(x) for x in args.budgets.split(",")):
                for m in args.methods.split(","):
                    if any((r["method"], r["budget"], r["seed"]) == (m, budget, seed) for r in rows):
                        continue
                    row = run_row(m, b, data, budget, seed, version)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    with open(PATH, "a") as f:
                        f.write(json.dumps(row) + "\n")
    text = report(rows, seeds)
    print(text)
    with open(os.path.join(CACHE, f"allocation_{args.sensor}.md"), "w") as f:
        f.write(text + "\n")
    return 0


def load(version: str = VERSION) -> list[dict]:
    """Cached rows of this version of the bench (a changed task or protocol bumps ``VERSION``)."""
    if not os.path.exists(PATH):
        return []
    with open(PATH) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("version") == version]


if __name__ == "__main__":
    sys.exit(main())
