"""The users' question on super-resolution (issue 25 items 8 and 9d): a base trained far longer than the
recovery budget W, then every method at ``budget`` x the base's MACs gets the same W weight steps after it.

Task ``sr-users``: the 2x SR patches of bench/quality_sr.py (``sr_images``: 1-channel 32x32 HR, 16x16 LR,
the fixed standardisation ``(v - SR_MEAN) / SR_STD``), generated in chunks of ``CHUNK`` patches, chunk ``i``
of split ``k`` from generator seed ``GEN_SEEDS[k] + i`` (no draw shared with bench/quality_sr.py's
``SR_SEEDS`` 2101-2103 or across splits): 20000 train / 2000 val / 10000 test (cached in bench/.cache/).
Base: ``sr_model(seed)`` (ESPCN 1 -> 32 -> 32 -> 4 + bilinear residual, 2.87M MACs), trained with the SR
base recipe (``fxadapt.finetune``, SGD lr ``SR_LR`` = 0.5, cosine, L1, no teacher) for ``BASE_EPOCHS`` =
20 epochs = 6240 steps; bases 0, 1, 2 (cached). The base length is fixed in advance (not chosen on test or
val).

Recovery budget ``W`` = 100 SGD steps (batch 64) after the base: base = 62.4 W. A search's own weight
steps count: ``importance`` (bench/quality_methods.py's configuration for a regression task:
``ImportanceConfig(loss="mse", loss_fn=l1)``, ``steps = W // 2`` distillation steps inside the search) is
fine-tuned ``W - s`` steps, ``s`` its weight steps read from its history; data-free and Torch-Pruning
(uniform L1 / global group L2) take no weight step and are fine-tuned W steps. Fine-tuning is the SR
protocol's recipe (bench/quality.py, ``KINDS["sr"]``): ``fxadapt.finetune``, SGD 0.5 cosine, loss
``0.5 L1(y) + 0.5 L1(base(x))``, batch 64; ``k`` steps are one epoch over ``k * 64`` training patches
drawn by the fine-tune seed (the same draw for every method of a run: paired). ``scratch-W`` (the floor,
a diagnostic): the data-free widths re-initialised, trained the same W steps with the same recipe.

A run is (base seed, fine-tune seed). Metric: mean per-patch PSNR (dB, bench/quality_sr.py ``psnr``).
Tables: per budget the mean test / val PSNR per method ± the 95% t-interval over runs, the val PSNR before
recovery, and ``importance`` minus the best keep-weights baseline (data-free, tp-uniform, tp-global: the
one with the highest mean *val* PSNR in that budget), paired per run, mean ± 95% t-interval, on test and
val. Nothing is chosen on test. Rows are cached in bench/.cache/users_protocol_sr.jsonl, keyed by
(method, budget, base, seed, config hash); rerunning skips finished rows.

    python bench/users_protocol_sr.py --data-only                       # generate / cache the splits
    python bench/users_protocol_sr.py --bases-only --bases 0            # one base (also 1, 2; 2 processes)
    python bench/users_protocol_sr.py --runs 0:0,1:0,0:2 --budgets 0.25,0.1,0.5 --floor-seeds 0 --no-report
    python bench/users_protocol_sr.py --runs 0:1,1:1,1:2 --budgets 0.25,0.1,0.5 --floor-seeds 0 --no-report
    python bench/users_protocol_sr.py --runs 2:0,2:1,2:2 --budgets 0.25,0.1,0.5 --floor-seeds 0 --no-report
    python bench/users_protocol_sr.py --runs 0:3,1:3,2:3 --budgets 0.25,0.1,0.5 \\
        --methods datafree,tp-uniform,tp-global,importance --no-report
    python bench/users_protocol_sr.py --runs 0:0,1:0,0:1,1:1,0:2,1:2,2:0,2:1,2:2 --budgets 0.25,0.1 \\
        --methods importance-oneshot,importance-lr5,importance-floor --no-report     # val diagnostics
    python bench/users_protocol_sr.py --report                          # tables from the cache
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol_rows  # noqa: E402
from quality import stable  # noqa: E402
from quality_methods import candidate, code_revision, count_macs, method_config  # noqa: E402
from quality_report import interval  # noqa: E402
from quality_sr import (  # noqa: E402
    CONSTANTS,
    SR_LR,
    SR_MEAN,
    SR_STD,
    downsample,
    l1,
    psnr,
    psnr_bicubic,
    sr_images,
    sr_model,
)
from quality_tasks import CACHE  # noqa: E402

from fxadapt.train.finetune import FinetuneConfig, finetune  # noqa: E402

PROTOCOL = "issue25-users-sr-v1"
TASK = "sr-users"
SPLIT = (20000, 2000, 10000)
GEN_SEEDS = (25_000, 26_000, 27_000)     # chunk i of a split: GEN_SEEDS[split] + i
CHUNK = 2000
BASE_EPOCHS = 20
W = 100
BATCH = 64
BUDGETS = (0.5, 0.25, 0.1)
BASELINES = ("datafree", "tp-uniform", "tp-global")      # keep the base's weights
METHODS = BASELINES + ("importance", "scratch-W")
# val diagnostics, on request
ABLATIONS = ("importance-oneshot", "importance-lr5", "importance-floor", "importance-lrr",
             "importance-fisher")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = os.path.join(CACHE, "users_protocol_sr.jsonl")
RESULTS = os.path.join(ROOT, "bench", "results", "users_protocol_sr")


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def data_hash() -> str:
    return _hash([TASK, SPLIT, GEN_SEEDS, CHUNK, stable(CONSTANTS)])


def users_task() -> dict:
    """{split: (LR, HR)} standardised, generated chunk by chunk (cached)."""
    path = os.path.join(CACHE, f"users_sr_data_{data_hash()}.pt")
    if os.path.exists(path):
        return torch.load(path)
    data = {}
    for name, n, seed in zip(("train", "val", "test"), SPLIT, GEN_SEEDS):
        hr = torch.cat([sr_images(min(CHUNK, n - i), seed + i // CHUNK) for i in range(0, n, CHUNK)])
        data[name] = ((downsample(hr) - SR_MEAN) / SR_STD, (hr - SR_MEAN) / SR_STD)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(data, path)
    return data


def base_cfg(seed: int) -> FinetuneConfig:
    return FinetuneConfig(lr=SR_LR, kd=0.0, seed=seed)


def ft_cfg(seed: int) -> FinetuneConfig:
    return FinetuneConfig(lr=SR_LR, seed=seed)      # KINDS["sr"].finetune_config(seed=seed)


def base_path(seed: int) -> str:
    key = _hash([data_hash(), BASE_EPOCHS, stable(base_cfg(seed)), "l1"])
    return os.path.join(CACHE, f"users_sr_base_s{seed}_{key}.pt")


def trained_base(data: dict, seed: int) -> torch.nn.Module:
    path, model = base_path(seed), sr_model(seed)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    t0 = time.perf_counter()
    finetune(model, data["train"], BASE_EPOCHS, cfg=base_cfg(seed), loss_fn=l1)
    print(f"[base {seed}] {time.perf_counter() - t0:.0f} s, val {psnr(model, data['val']):.3f} dB",
          flush=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def base_steps(data: dict | None = None) -> int:
    return BASE_EPOCHS * (SPLIT[0] // BATCH)


def opts() -> dict:
    return {"search_steps": W // 2, "fur_iterations": 1, "search_val": "train", "loss_fn": l1, "lr": SR_LR}


def row_hash(method: str) -> str:
    cfg = None if method == "scratch-W" else method_config(method, 0, opts())
    return _hash(code_revision(method) | {"protocol": PROTOCOL, "data": data_hash(),
                                          "base_epochs": BASE_EPOCHS, "W": W,
                  "method": method, "config": stable(cfg), "finetune": stable(ft_cfg(0)),
                  "base": stable(base_cfg(0)), "loss": "l1"})


def recover(model, base, data: dict, steps: int, seed: int) -> None:
    """``steps`` SGD steps of the distillation recipe: one epoch over ``steps * 64`` patches drawn by
    ``seed``."""
    if steps <= 0:
        return
    idx = torch.randperm(len(data["train"][0]), generator=torch.Generator().manual_seed(10_000 + seed))
    idx = idx[:steps * BATCH]
    finetune(model, (data["train"][0][idx], data["train"][1][idx]), 1, teacher=copy.deepcopy(base),
             cfg=ft_cfg(seed), loss_fn=l1)


_KEPT: dict = {}   # (base seed, budget, method) -> a seed-free candidate and its numbers (once per process)


def prepared(method: str, base, b: int, data: dict, budget: float, seed: int) -> tuple:
    """(candidate, seconds, search weight steps, val PSNR before recovery); the keep-weights baselines do
    not depend on the seed, so each is built once per (base, budget) and process."""
    key = (b, budget, method)
    if key in _KEPT:
        model, *rest = _KEPT[key]
        return (copy.deepcopy(model), *rest)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    name = "uniform" if method == "scratch-W" else method
    model, _, steps = candidate(name, base, data, budget, seed, opts())
    out = (model, time.perf_counter() - t0, steps, psnr(model, data["val"]))
    if method in BASELINES:
        _KEPT[key] = (copy.deepcopy(model), *out[1:])
    return out


def run_row(method: str, base, b: int, data: dict, budget: float, seed: int) -> dict:
    model, search_s, search_steps, val_before = prepared(method, base, b, data, budget, seed)
    x = data["train"][0][:1]
    ratio = count_macs(model, x) / count_macs(base, x)
    t0 = time.perf_counter()
    recover(model, base, data, W - search_steps, seed)
    ft_s = time.perf_counter() - t0
    return {"psnr": psnr(model, data["test"]), "val_psnr": psnr(model, data["val"]), "val_before": val_before,
            "macs_ratio": ratio, "search_steps": search_steps, "finetune_steps": W - search_steps,
            "search_s": search_s, "finetune_s": ft_s}


def load_rows() -> list[dict]:
    return protocol_rows.load_rows(ROWS)


def run(runs, budgets, methods, floor_seeds) -> None:
    """``protocol_rows.run`` on this protocol."""
    protocol_rows.run(sys.modules[__name__], runs, budgets, methods, floor_seeds)


def _cell(v: list[float]) -> str:
    if not v:
        return "—"
    m, h = interval(v)
    return f"{m:.3f} ± {h:.3f}"


def _method_table(by: dict, runs: list, budgets: list, res: dict) -> list[str]:
    out = ["| budget | method | runs | test PSNR dB | val PSNR dB | val before recovery dB | MACs ratio | "
           "search + fine-tune steps |", "|---|---|---|---|---|---|---|---|"]
    for bud in budgets:
        cell = res["budgets"].setdefault(str(bud), {"methods": {}})
        for m in METHODS + ABLATIONS:
            rr = [by[(m, bud) + r] for r in runs if (m, bud) + r in by]
            if not rr:
                continue
            steps = sorted({(r["search_steps"], r["finetune_steps"]) for r in rr})
            keys = ("psnr", "val_psnr", "val_before")
            cell["methods"][m] = {k: interval([r[k] for r in rr]) for k in keys} | {"runs": len(rr)}
            ratio = sum(r["macs_ratio"] for r in rr) / len(rr)
            out.append(f"| {bud} | {m} | {len(rr)} | {_cell([r['psnr'] for r in rr])} | "
                       f"{_cell([r['val_psnr'] for r in rr])} | {_cell([r['val_before'] for r in rr])} | "
                       f"{ratio:.3f} | {', '.join(f'{a} + {b}' for a, b in steps)} |")
    return out


def _diff_table(by: dict, runs: list, budgets: list, res: dict) -> list[str]:
    out = ["importance (and ablations) − the best keep-weights baseline (chosen per budget by mean val PSNR "
           "over the runs both have), paired per run, dB, mean ± 95% t-interval:", "",
           "| budget | method | best baseline (val) | runs | Δ test dB | Δ val dB |",
           "|---|---|---|---|---|---|"]
    for bud in budgets:
        cell = res["budgets"].setdefault(str(bud), {"methods": {}})
        for m in ("importance",) + ABLATIONS:
            found = protocol_rows.paired_diff(by, runs, bud, m, BASELINES, ("psnr", "val_psnr"))
            if found is None:
                continue
            best, paired, d = found
            cell.setdefault("diff", {})[m] = {"baseline": best, "runs": len(paired),
                                              "test": interval(d["psnr"]), "val": interval(d["val_psnr"])}
            out.append(f"| {bud} | {m} | {best} | {len(paired)} | {_cell(d['psnr'])} | "
                       f"{_cell(d['val_psnr'])} |")
    return out


def summary(rows: list[dict]) -> tuple[str, dict]:
    """Markdown tables and their numbers (see module docstring)."""
    by, runs, budgets, rows = protocol_rows.indexed(sys.modules[__name__], rows)
    res = {"W": W, "base_steps": base_steps(), "budgets": {}, "runs": [list(r) for r in runs],
           "n_rows": len(rows)}
    out = _method_table(by, runs, budgets, res) + [""] + _diff_table(by, runs, budgets, res)
    return "\n".join(out), res


def report() -> str:
    rows = load_rows()
    text, res = summary(rows)
    data = users_task()
    lines = [f"bicubic: test {psnr_bicubic(data['test']):.3f} dB, val {psnr_bicubic(data['val']):.3f} dB"]
    for b in sorted({r["base"] for r in rows}):
        if os.path.exists(base_path(b)):
            m = trained_base(data, b)
            v = (psnr(m, data["test"]), psnr(m, data["val"]))
            res.setdefault("base_psnr", {})[b] = v
            lines.append(f"base {b}: test {v[0]:.3f} dB, val {v[1]:.3f} dB")
    cmd = __doc__.split("\n\n    python")[1:]
    head = ("Reproduce (OMP_NUM_THREADS=1, at most 2 processes):\n\n    python" + "\n    python".join(cmd)
            + f"\nTask {TASK}: {SPLIT[0]} train / {SPLIT[1]} val / {SPLIT[2]} test patches. W = {W} steps "
            f"after the base; base {res['base_steps']} steps ({res['base_steps'] / W:.1f} W).\n")
    runs = ", ".join(f"{b}:{s}" for b, s in res["runs"])
    text = head + "\n".join(lines) + f"\n\nRuns (base:seed): {runs}.\n\n" + text
    protocol_rows.write_results(RESULTS, text, res)
    return text


def main(argv=None) -> int:
    return protocol_rows.main(sys.modules[__name__], argv, seeds="0,1,2")


if __name__ == "__main__":
    sys.exit(main())
