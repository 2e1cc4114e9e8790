"""LM quality in the users' protocol (issue 25 items 8 and 9c): a small GPT-2 trained on the standard
library's sources, adapted to 0.5, 0.25 and 0.1 of its MACs, every method given the same W weight steps
after the base and the same distillation; runs paired, intervals, choices on a validation slice.

    python bench/bench_lm_quality.py --seeds 0 --ft-seeds 0,1,2,3 --ratios 0.5,0.25,0.1 \
        --methods datafree,magnitude,importance        # one process per base seed (also 1, 2); resumable
    python bench/bench_lm_quality.py --seeds 0,1,2 --ft-seeds 0,1,2,3 --ratios 0.5,0.25,0.1 --report

A run is (base seed ``s``, fine-tune seed ``f``): 3 bases x 4 fine-tune seeds = 12 paired runs. Run (s, 0)
uses the seeds of the earlier three-seed protocol; fine-tune seed ``f`` shifts the importance strategy's
seed, its calibration windows and the fine-tune's windows by ``7919 f`` (``run_seed_of``); the keep-weights
baselines do not depend on it (built once per base). The rows behind README's table are
``bench/results/lm_quality_rows.jsonl`` (``--out`` it with ``--report``).

Corpus: ``Path(os.__file__).parent.glob("*.py")`` in sorted name order, concatenated as bytes (V = 256); the
last 10% of the bytes are held out and split in halves: **val** (the first half) and **test** (the second).
Perplexity is ``exp`` of the mean next-byte cross-entropy over non-overlapping windows of ``SEQ`` bytes
spread evenly over a slice: ``--eval-windows`` (2048) on test, ``--val-windows`` on val. Every choice
reads val; test is only reported.

Per base seed ``s``: a base GPT-2 (init seed ``s``) trained ``B`` steps (``--base-steps``, at least 20 W) with
cross-entropy; then per MACs ratio ``r`` (``--ratios``) every method gets ``W`` (``--w``) weight steps
after the base, counted from the search history where a search takes weight steps:

- ``datafree``: ``fxadapt.transform(base, r)``, no data;
- ``magnitude``: the Torch-Pruning LLM recipe by hand (bench/lm_magnitude.py: whole heads and MLP neurons by
  L1, one ratio for both, hidden size kept), bisected to the data-free result's MACs;
- ``importance``: ``strategy="importance"`` with ``ImportanceConfig(steps=S, batch_size=BATCH)`` on
  ``--calib-windows`` training windows (inputs only; its weight steps distil from the base), then
  ``W - S`` fine-tune steps;
- ``importance-screen``: the same with ``screen=True`` (fxadapt.search.screen: axis candidates, S steps in
  all), the axis it kept recorded;
- ``importance-floor`` (``--methods`` to add it): the same with ``floor=0.5`` (every group keeps at least half
  its uniformly scaled width);
- ``base-ft`` (``--methods`` to add it): the unadapted base given the same fine-tune (1.0x reference).

Fine-tune (every method, the same recipe): AdamW (betas 0.9 / 0.95, weight decay 0.01, lr ``--ft-lr``),
linear warm-up (5%) then cosine to 0, batch ``BATCH``, loss ``KL(base || student)`` on the logits (T = 1,
the mean over tokens), the same windows in the same order for every method of a seed. Report per ratio:
test perplexity mean ± the 95% t-interval over runs; paired differences (same run) against the
keep-weights baseline (datafree, magnitude) with the lowest mean val perplexity among those within 5% of the
budget (magnitude keeps the hidden size and cannot get below 0.162x: no baseline at 0.1x). Rows are cached in
``bench/.cache/lm_quality25_rows.jsonl`` keyed by (method, ratio, seed, config hash); bases in
``bench/.cache/lm_base_*.pt``.

Sizes (3 seeds, one process per seed, one thread each, on 2 cores shared with other jobs): GPT-2 3 x 96
(4 heads), ``SEQ`` 64, batch 16, B = 1000 = 20 W, W = 50, S = 24 (the screen: 4 candidates x 3 steps, the
winner 12 more), 2048 test windows, 256 val windows, 2048 calibration windows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_magnitude import magnitude_at  # noqa: E402
from quality import interval, provenance, stable  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.analysis.count import count_macs  # noqa: E402
from fxadapt.search.importance import ImportanceConfig  # noqa: E402

PROTOCOL = "issue25-lm-equal-steps-distill-v1"
CACHE = Path(__file__).resolve().parent / ".cache"
SEQ, BATCH, VOCAB = 64, 16, 256
CONFIG = dict(n_layer=3, n_embd=96, n_head=4, n_positions=SEQ, vocab_size=VOCAB,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
              eos_token_id=0)
METHODS = ("datafree", "magnitude", "importance", "importance-screen")
KEEP_WEIGHTS = ("datafree", "magnitude")
LABELS = {"base-ft": "base + the same fine-tune (1.0x, reference)", "datafree": "fxadapt data-free",
          "magnitude": "magnitude heads+MLP (TP LLM recipe)", "importance": "importance (screen off)",
          "importance-screen": "importance (screen on)", "importance-floor": "importance (floor 0.5)",
          "importance-fisher": "importance (fisher scores everywhere)"}


# ---------------------------------------------------------------- data
def corpus() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test) byte tensors: the stdlib's top-level ``*.py`` files, sorted; the last 10% held
    out, its first half val, its second half test."""
    files = sorted(Path(os.__file__).parent.glob("*.py"), key=lambda p: p.name)
    data = torch.frombuffer(bytearray(b"\n".join(p.read_bytes() for p in files)), dtype=torch.uint8).long()
    cut = int(len(data) * 0.90)
    mid = cut + (len(data) - cut) // 2
    return data[:cut], data[cut:mid], data[mid:]


def windows(data: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = offsets[:, None] + torch.arange(SEQ + 1)
    w = data[idx]
    return w[:, :-1], w[:, 1:]


def random_offsets(data: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(data) - SEQ - 1, (n,), generator=g)


def heldout_offsets(data: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` non-overlapping windows spread evenly over a held-out slice."""
    total = (len(data) - 1) // SEQ
    return torch.linspace(0, total - 1, min(n, total)).long() * SEQ


# ---------------------------------------------------------------- model, loss, training
def logits_of(out) -> torch.Tensor:
    """Logits from an HF ``CausalLMOutput``-like object, a tuple (first element) or a tensor."""
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def lm_loss(outputs, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: ``outputs`` [B, T, V] (or an object carrying ``.logits``), ``y`` [B, T]."""
    return F.cross_entropy(logits_of(outputs).float().flatten(0, 1), y.flatten())


def kd_loss(outputs, t_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher || student)`` at T = 1, the mean over tokens."""
    s = F.log_softmax(logits_of(outputs).float().flatten(0, 1), -1)
    return F.kl_div(s, F.log_softmax(t_logits.float().flatten(0, 1), -1), log_target=True,
                    reduction="batchmean")


def train(model: nn.Module, data: torch.Tensor, steps: int, lr: float, seed: int,
          teacher: nn.Module | None = None) -> float:
    """AdamW, linear warm-up (5%) then cosine to 0, batch ``BATCH``, offsets drawn from ``seed``;
    cross-entropy, or the KL to ``teacher``'s logits when given. Returns wall seconds."""
    torch.manual_seed(seed)
    offsets = random_offsets(data, steps * BATCH, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    model.train()
    start = time.perf_counter()
    for s in range(steps):
        f = (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        x, y = windows(data, offsets[s * BATCH:(s + 1) * BATCH])
        if teacher is None:
            loss = lm_loss(model(x), y)
        else:
            with torch.no_grad():
                t = logits_of(teacher(x))
            loss = kd_loss(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s % 500 == 0 or s == steps - 1:
            print(f"    step {s:5d}/{steps}  loss {loss.item():.3f}", flush=True)
    return time.perf_counter() - start


@torch.no_grad()
def perplexity(model: nn.Module, held: torch.Tensor, n_windows: int) -> float:
    model.eval()
    offsets = heldout_offsets(held, n_windows)
    total, count = 0.0, 0
    for i in range(0, len(offsets), 64):
        x, y = windows(held, offsets[i:i + 64])
        total += float(lm_loss(model(x), y)) * y.numel()
        count += y.numel()
    return math.exp(total / count)


def base_model(args, train_data: torch.Tensor, seed: int) -> tuple[nn.Module, float]:
    """The trained base of ``seed`` (cached by its settings), and its training wall time."""
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = T.GPT2LMHeadModel(T.GPT2Config(**CONFIG))
    path = CACHE / f"lm_base_{config_hash(args, 'base')}_s{seed}.pt"
    if path.exists():
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["state"])
        return model, ck["seconds"]
    print(f"[seed {seed}] training the base GPT-2 for {args.base_steps} steps", flush=True)
    seconds = train(model, train_data, args.base_steps, args.base_lr, seed=seed)
    torch.save({"state": model.state_dict(), "seconds": seconds}, path)
    return model, seconds


# ---------------------------------------------------------------- methods
def run_seed_of(seed: int, ft: int, offset: int = 0) -> int:
    """The seed of run (base ``seed``, fine-tune seed ``ft``) for a stream ``offset``; run (s, 0) keeps the
    seeds of the three-seed protocol, so its cached rows stay valid."""
    return offset + seed + 7919 * ft


def importance_config(args, seed: int, method: str) -> ImportanceConfig:
    """``importance``'s config; ``-screen`` screens the axes, ``-floor`` keeps >= 0.5 x the uniform widths."""
    return ImportanceConfig(steps=args.search_steps, batch_size=BATCH, seed=seed,
                            screen=method == "importance-screen",
                            floor=0.5 if method == "importance-floor" else 0.0,
                            kind="fisher" if method == "importance-fisher" else ImportanceConfig.kind)


def screened(model: nn.Module) -> tuple[str | None, str | None]:
    """(the axis candidate the screen kept, the report's note) from the result's history."""
    last = fxadapt.report(model).history[-1]
    return (last.get("chosen"), last.get("note")) if isinstance(last, dict) else (None, None)


_KEPT: dict = {}   # (method, ratio, base seed) -> a keep-weights candidate (no seed): built once per process


def candidate(method: str, ratio: float, base, ex, train_data, args, seed, ft: int = 0
              ) -> tuple[nn.Module, str | None, int]:
    """(model at ``ratio`` of the MACs, a note, weight steps taken choosing it); the keep-weights ones do
    not depend on the fine-tune seed ``ft`` and are built once per base."""
    import copy

    if method in KEEP_WEIGHTS:
        key = (method, ratio, seed)
        if key not in _KEPT:
            _KEPT[key] = keep_weights(method, ratio, base, ex)
        model, note = _KEPT[key]
        return copy.deepcopy(model), note, 0
    if method == "base-ft":
        return copy.deepcopy(base), "reference: no adaptation", 0
    x, _ = windows(train_data, random_offsets(train_data, args.calib_windows,
                                              seed=run_seed_of(10 * seed, ft, 2)))
    cfg = importance_config(args, run_seed_of(seed, ft), method)
    model = fxadapt.transform(base, ratio, ex, data={"input_ids": x}, strategy="importance", importance=cfg)
    steps = sum(1 for h in fxadapt.report(model).history if isinstance(h, dict) and "step" in h)
    chosen, note = screened(model)
    return model, (f"screen kept {chosen}: {note}" if chosen else None), steps


def keep_weights(method: str, ratio: float, base, ex) -> tuple[nn.Module, str | None]:
    """The keep-weights baselines: fxadapt data-free, and magnitude heads+MLP at its MACs."""
    if method == "datafree":
        return fxadapt.transform(base, ratio, ex), None
    model, p = magnitude_at(base, count_macs(fxadapt.transform(base, ratio, ex), ex), ex)
    heads = [b.attn.num_heads for b in model.transformer.h]
    inner = [b.mlp.c_fc.weight.shape[1] for b in model.transformer.h]
    return model, f"L1 magnitude p={p:.4f}, heads/layer {heads}, MLP {inner}"


def widths(model: nn.Module) -> dict:
    """Hidden size, heads and MLP inner width per layer, read from the modules."""
    h = model.transformer.h
    return {"hidden": int(model.transformer.wte.weight.shape[1]),
            "qkv": [int(b.attn.c_attn.weight.shape[1]) for b in h],
            "mlp": [int(b.mlp.c_fc.weight.shape[1]) for b in h]}


def run_row(method, ratio, run: tuple[int, int], base, ex, data, args) -> dict:
    """Adapt, count, train to W weight steps after the base with the distillation recipe, evaluate."""
    train_data, val, test = data
    seed, ft = run
    print(f"[run {run}] [{method} @ {ratio}] adapting", flush=True)
    start = time.perf_counter()
    model, note, search_steps = candidate(method, ratio, base, ex, train_data, args, seed, ft)
    adapt_s = time.perf_counter() - start
    ft_steps = args.w - search_steps
    row = {"macs": count_macs(model, ex), "params": sum(p.numel() for p in model.parameters()),
           "adapt_s": adapt_s, "note": note, "widths": widths(model), "search_steps": search_steps,
           "finetune_steps": ft_steps, "val_before": perplexity(model, val, args.val_windows)}
    print(f"[seed {seed}] [{method} @ {ratio}] val ppl {row['val_before']:.3f}; {ft_steps} steps", flush=True)
    row["finetune_s"] = train(model, train_data, ft_steps, args.ft_lr, seed=run_seed_of(seed, ft, 1000),
                              teacher=base.eval())
    row["val"], row["test"] = perplexity(model, val, args.val_windows), \
        perplexity(model, test, args.eval_windows)
    return row


# ---------------------------------------------------------------- cache
SETTINGS = ("base_steps", "base_lr", "w", "ft_lr", "search_steps", "calib_windows", "eval_windows",
            "val_windows")


def config_hash(args, method: str) -> str:
    """Every setting that defines ``method``'s row (the base's settings for "base"), defaults included."""
    keys = ("base_steps", "base_lr") if method == "base" else SETTINGS
    imp = stable(importance_config(args, 0, method)) \
        if method.startswith("importance") else None
    payload = {"protocol": PROTOCOL, "seq": SEQ,
               "batch": BATCH, "model": CONFIG, "method": method,
               "settings": {k: getattr(args, k) for k in keys}, "importance": imp}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list({(r["method"], r.get("ratio"), run_of(r), r["config_hash"]): r for r in rows}.values())


def run_of(row: dict) -> tuple[int, int]:
    """A row's run: (base seed, fine-tune seed); rows of the three-seed protocol are fine-tune seed 0."""
    return row["seed"], row.get("ft_seed", 0)


def run_seed(seed: int, data, args, path: Path) -> None:
    """Every row of base ``seed``: the base, then each fine-tune seed x ratio x method."""
    ex = {"input_ids": data[1][:SEQ][None]}
    base, base_s = base_model(args, data[0], seed)
    todo = [("base", 1.0, 0)] + [(m, r, ft) for ft in args.ft_list for r in args.ratio_list
                                 for m in args.method_list]
    for method, ratio, ft in todo:
        h = config_hash(args, method)
        if any(r["method"] == method and r.get("ratio") == ratio and run_of(r) == (seed, ft)
               and r["config_hash"] == h for r in load_rows(path)):
            continue
        row = {"method": method, "ratio": ratio, "seed": seed, "ft_seed": ft, "config_hash": h}
        if method == "base":
            row |= {"macs": count_macs(base, ex), "params": sum(p.numel() for p in base.parameters()),
                    "val": perplexity(base, data[1], args.val_windows), "train_s": base_s,
                    "test": perplexity(base, data[2], args.eval_windows)}
        else:
            try:
                row |= run_row(method, ratio, (seed, ft), base, ex, data, args)
            except Exception as e:  # noqa: BLE001  (a failing method is a printed row, not a crash; not cached)
                print(json.dumps(row | {"error": f"{type(e).__name__}: {e}"}), flush=True)
                continue
        row |= provenance()
        print(json.dumps(row), flush=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- report
def _ci(v: list[float], sign: str = "") -> str:
    m, h = interval(v)
    return f"{m:{sign}.3f} ± {h:.3f}"


def missing(rows: list[dict], target: float) -> dict[str, float]:
    """The keep-weights baselines that miss ``target`` MACs by more than 5% (magnitude heads+MLP keeps the
    hidden size and cannot go below ~0.16x): their MACs; they are shown but are not the reference."""
    macs = {m: max(r["macs"] for r in rows if r["method"] == m) for m in KEEP_WEIGHTS
            if any(r["method"] == m for r in rows)}
    return {m: v for m, v in macs.items() if v > 1.05 * target}


def report_ratio(rows: list[dict], ratio: float, full: float) -> list[str]:
    rows = [r for r in rows if r.get("ratio") == ratio and r["method"] != "base"]
    test = {m: {run_of(r): r["test"] for r in rows if r["method"] == m} for m in LABELS}
    val = {m: {run_of(r): r["val"] for r in rows if r["method"] == m} for m in LABELS}
    over = missing(rows, ratio * full)
    ref = min((m for m in KEEP_WEIGHTS if val[m] and m not in over),
              key=lambda m: statistics.mean(val[m].values()), default=None)
    lines = [f"\n### {ratio} of the MACs (best keep-weights baseline on val: {ref})\n"]
    lines += [f"{LABELS[m]}: its smallest model is {v / full:.3f}x of the MACs, so it is no baseline here\n"
              for m, v in sorted(over.items())]
    lines += [
             "| method | MACs ratio | steps (search + FT) | widths (hidden / qkv / MLP, first run) | "
             "val ppl | test ppl (n) | − best keep-weights (paired) | adapt s / FT s |",
             "|---|---:|---|---|---:|---:|---:|---|"]
    for m in LABELS:
        rs = sorted((r for r in rows if r["method"] == m), key=run_of)
        if not rs:
            continue
        common = sorted(set(test[m]) & set(test[ref])) if ref else []
        diff = ("reference" if m == ref else
                _ci([test[m][s] - test[ref][s] for s in common], "+") if len(common) > 1 else "")
        w = rs[0]["widths"]
        lines.append(
            f"| {LABELS[m]} | {statistics.mean(r['macs'] for r in rs) / full:.3f} | "
            f"{rs[0]['search_steps']} + {rs[0]['finetune_steps']} | "
            f"{w['hidden']} / {w['qkv']} / {w['mlp']} | "
            f"{_ci(list(val[m].values()))} | {_ci(list(test[m].values()))} ({len(rs)}) | {diff} | "
            f"{statistics.mean(r['adapt_s'] for r in rs):.1f} / "
            f"{statistics.mean(r['finetune_s'] for r in rs):.1f} |")
    chosen = [f"run {run_of(r)}: {r['note'].split(':')[0].removeprefix('screen kept ')}"
              for r in sorted(rows, key=run_of)
              if r["method"] == "importance-screen" and r["note"]]
    if chosen:
        lines.append("\nscreen kept: " + "; ".join(chosen))
    on, off = test["importance-screen"], test["importance"]
    common = sorted(set(on) & set(off))
    if len(common) > 1:
        d = [on[s] - off[s] for s in common]
        lines.append(f"screen on − screen off (test ppl, paired): {_ci(d, '+')}")
    return lines + paired(val, test, "importance-floor", "importance")


def paired(val: dict, test: dict, a: str, b: str) -> list[str]:
    """``a − b`` on val and test, paired by seed (empty under 2 common seeds)."""
    common = sorted(set(test[a]) & set(test[b]) & set(val[a]) & set(val[b]))
    if len(common) < 2:
        return []
    dv, dt = ([d[a][s] - d[b][s] for s in common] for d in (val, test))
    return [f"{a} − {b} (paired, {len(common)} seeds): val {_ci(dv, '+')}, test {_ci(dt, '+')}"]


def report(rows: list[dict], ratios: list[float]) -> str:
    bases = [r for r in rows if r["method"] == "base"]
    full = statistics.mean(r["macs"] for r in bases)
    lines = [f"base: test ppl {_ci([r['test'] for r in bases])} ({len(bases)} seeds)"]
    for ratio in ratios:
        lines += report_ratio(rows, ratio, full)
    return "\n".join(lines)


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ft-seeds", default="0", help="fine-tune seeds per base: runs = bases x these")
    ap.add_argument("--ratios", default="0.5,0.25")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--base-steps", type=int, default=1000)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--w", type=int, default=50, help="W: weight steps after the base, every method")
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--search-steps", type=int, default=24, help="S: the importance strategy's steps")
    ap.add_argument("--calib-windows", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=2048)
    ap.add_argument("--val-windows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only print the table from the cache")
    ap.add_argument("--out", default=str(CACHE / "lm_quality25_rows.jsonl"))
    args = ap.parse_args(argv)
    args.ratio_list = [float(r) for r in args.ratios.split(",")]
    args.method_list = args.methods.split(",")
    args.ft_list = [int(s) for s in args.ft_seeds.split(",")]
    if args.base_steps < 20 * args.w:
        ap.error(f"--base-steps must be at least 20 x W = {20 * args.w}")
    return args


def main(argv=None) -> None:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    CACHE.mkdir(parents=True, exist_ok=True)
    path, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    if not args.report:
        data = corpus()
        for seed in seeds:
            run_seed(seed, data, args, path)
    rows = [r for r in load_rows(path) if r["seed"] in seeds and run_of(r)[1] in args.ft_list
            and r["config_hash"] == config_hash(args, r["method"])]
    text = report(rows, args.ratio_list)
    path.with_name(path.stem.removesuffix("_rows") + ".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
