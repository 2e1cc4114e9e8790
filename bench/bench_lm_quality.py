"""LM quality row in the fair protocol of bench/quality.py (issue 8 item 7; issue 15 item 3): a small GPT-2
trained on the standard library's sources, adapted to 0.5 of its MACs, every candidate given the same number
of weight-update steps after the base; seeds, intervals and choices on a validation slice.

    python bench/bench_lm_quality.py --seeds 0,1,2 --threads 1        # resumable (rows cached)
    python bench/bench_lm_quality.py --seeds 0,1,2 --report           # the tables from the cache only

Corpus: ``Path(os.__file__).parent.glob("*.py")`` in sorted name order, concatenated as bytes (V = 256); the
last 5% of the bytes are held out and split in halves: **val** (the first half) and **test** (the second).
Perplexity is ``exp`` of the mean next-byte cross-entropy over ``--eval-windows`` non-overlapping windows
of ``SEQ`` bytes spread evenly over a slice. Every choice reads val; test is only reported.

Per seed ``s`` (0, 1, 2): a base GPT-2 (init seed ``s``) trained ``B`` steps (``--base-steps``), then the
candidates at the MACs of fxadapt's data-free result (``fxadapt.analysis.count.count_macs`` on
``{"input_ids": [1, SEQ]}``). Equal training: after the base every candidate gets ``W = S + F`` AdamW
steps on its weights (``S = --search-steps``, ``F = --ft-steps``):

- ``dna``: fxadapt DNA (``SearchConfig(loss_fn=lm_loss, steps=S)``; its weight steps are AdamW at 1e-3,
  ``w_optimizer="auto"``; gate steps read other training windows), then fine-tuned ``F`` steps; its weight
  steps are counted from the search history. If the search cannot take the model's ``CausalLMOutput``,
  the error is recorded and it runs on a wrapper returning logits.
- ``datafree`` (default attention mode), ``datafree-heads`` (``attention="heads"``) and ``magnitude`` (the
  Torch-Pruning LLM recipe by hand, bench/lm_magnitude.py, bisected to the data-free MACs): no weight step
  choosing the widths; fine-tuned ``W`` steps.
- ``scratch``: the data-free widths, weights re-initialised (GPT-2's init: N(0, 0.02), LayerNorm 1 / 0)
  and trained ``B + W`` steps with the base's recipe (the base's steps plus W, as ``uniform`` in
  bench/quality.py).
- ``base-ft``: the unadapted base fine-tuned ``W`` steps (a reference at 1.0x MACs, not a baseline).

Training (base, fine-tunes, scratch): AdamW (betas 0.9 / 0.95, weight decay 0.01), linear warm-up (5%)
then cosine to 0, batch ``BATCH``; in one seed every fine-tune reads the same windows in the same order.
Report: test perplexity mean ± the 95% t-interval over seeds; paired differences (same base) against the
baseline (datafree, datafree-heads, magnitude, scratch) with the lowest mean *val* perplexity, and
against the best inherited-weight one (the first three). Rows are cached in
``bench/.cache/lm_quality_rows.jsonl`` keyed by (method, seed, config hash: every setting, the model
config, the method's options with defaults and ``PROTOCOL``); bases in ``bench/.cache/lm_base_*.pt``.

Sizes (issue 15 shrank them to fit 3 seeds in about 25 minutes on one thread): GPT-2 3 x 96 (4 heads),
``SEQ`` 64, batch 16, B = 600, S = 150, F = 250, so W = 400 (the single-seed row before issue 15: 4 x 128,
SEQ 128, base 900 steps, every candidate 400 fine-tune steps and DNA 300 more search steps).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from fxadapt.search.dna import SearchConfig  # noqa: E402

PROTOCOL = "issue15-lm-equal-steps-v1"
CACHE = Path(__file__).resolve().parent / ".cache"
SEQ, BATCH, VOCAB = 64, 16, 256
CONFIG = dict(n_layer=3, n_embd=96, n_head=4, n_positions=SEQ, vocab_size=VOCAB,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0,
              eos_token_id=0)
METHODS = ("base-ft", "datafree", "datafree-heads", "magnitude", "scratch", "dna")
BASELINES = ("datafree", "datafree-heads", "magnitude", "scratch")
INHERITED = ("datafree", "datafree-heads", "magnitude")
LABELS = {"base-ft": "base + the same fine-tune (1.0x, reference)", "datafree": "fxadapt data-free",
          "datafree-heads": "fxadapt data-free (heads)", "magnitude": "magnitude heads+MLP (TP LLM recipe)",
          "scratch": "data-free widths, from scratch", "dna": "fxadapt DNA"}


# ---------------------------------------------------------------- data
def corpus() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test) byte tensors: the stdlib's top-level ``*.py`` files, sorted; the last 5% held
    out, its first half val, its second half test."""
    files = sorted(Path(os.__file__).parent.glob("*.py"), key=lambda p: p.name)
    data = torch.frombuffer(bytearray(b"\n".join(p.read_bytes() for p in files)), dtype=torch.uint8).long()
    cut = int(len(data) * 0.95)
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


class Logits(nn.Module):
    """``lm(input_ids=...).logits``: the workaround when a search needs a tensor output."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


def train(model: nn.Module, data: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    """AdamW, linear warm-up (5%) then cosine to 0, batch ``BATCH``, offsets drawn from ``seed``; wall
    seconds."""
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
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if s % 200 == 0 or s == steps - 1:
            print(f"    step {s:5d}/{steps}  loss {loss.item():.3f}", flush=True)
    return time.perf_counter() - start


@torch.no_grad()
def perplexity(model: nn.Module, held: torch.Tensor, n_windows: int) -> float:
    model.eval()
    offsets = heldout_offsets(held, n_windows)
    total, count = 0.0, 0
    for i in range(0, len(offsets), BATCH):
        x, y = windows(held, offsets[i:i + BATCH])
        total += float(lm_loss(model(x), y)) * y.numel()
        count += y.numel()
    return math.exp(total / count)


@torch.no_grad()
def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """GPT-2's initialisation on every parameter: matrices N(0, 0.02), biases 0, LayerNorm scales 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        else:
            p.fill_(0.0 if name.endswith("bias") else 1.0)
    return model


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


# ---------------------------------------------------------------- candidates
def search_config(args, seed: int) -> SearchConfig:
    return SearchConfig(loss_fn=lm_loss, batch_size=BATCH, steps=args.search_steps,
                        warmup=max(1, args.search_steps // 6), seed=seed, progress=False)


def adapt_dna(base, ex, train_data, args, seed):
    """DNA on the model as is; if the search cannot take its output, record why and search
    ``Logits(base)``."""
    x, y = windows(train_data, random_offsets(train_data, args.dna_windows, seed=10 * seed + 2))
    xv, yv = windows(train_data, random_offsets(train_data, 256, seed=10 * seed + 3))
    kw = dict(data=(x, y), val_data=(xv, yv), strategy="dna")
    tag = f"{config_hash(args, 'dna')}_s{seed}"
    try:
        ck = dataclasses.replace(search_config(args, seed), checkpoint=str(CACHE / f"lm_dna_raw_{tag}.ckpt"))
        return fxadapt.transform(base, 0.5, ex, search=ck, **kw), None
    except Exception as e:  # noqa: BLE001  (recorded in the row, then worked around)
        error = f"{type(e).__name__}: {e}"
        print(f"    DNA on GPT2LMHeadModel failed: {error}; retrying on Logits(model)", flush=True)
    ck = dataclasses.replace(search_config(args, seed), checkpoint=str(CACHE / f"lm_dna_logits_{tag}.ckpt"))
    return fxadapt.transform(Logits(base), 0.5, ex, search=ck, **kw), \
            f"searched on Logits(model); as is: {error}"


def candidate(method: str, base, ex, train_data, args, seed) -> tuple[nn.Module, str | None, int]:
    """(model at 0.5 MACs, a note, weight steps taken choosing it)."""
    if method == "base-ft":
        return copy.deepcopy(base), "reference: no adaptation", 0
    if method in ("datafree", "datafree-heads", "scratch"):
        model = fxadapt.transform(base, 0.5, ex,
                                  **({"attention": "heads"} if method == "datafree-heads" else {}))
        return (reinitialise(model, seed), "data-free widths, re-initialised", 0) \
                if method == "scratch" else \
            (model, None, 0)
    if method == "magnitude":
        model, p = magnitude_at(base, count_macs(fxadapt.transform(base, 0.5, ex), ex), ex)
        heads = [b.attn.num_heads for b in model.transformer.h]
        inner = [b.mlp.c_fc.weight.shape[1] for b in model.transformer.h]
        return model, f"by hand (L1 magnitude), p={p:.4f}, heads/layer {heads}, MLP {inner}", 0
    model, note = adapt_dna(base, ex, train_data, args, seed)
    steps = sum(1 for h in fxadapt.report(model).history if isinstance(h, dict) and "step" in h)
    return model, note, steps


def moved(model: nn.Module) -> list | None:
    """``[group, before, after]`` for every group fxadapt's report says moved (``None``: not an fxadapt
    result)."""
    try:
        rep = fxadapt.report(model)
    except Exception:  # noqa: BLE001  (no report attached)
        return None
    return [[c.name, c.before, c.after] for c in rep.groups if c.before != c.after]


def run_row(method, seed, base, ex, data, args) -> dict:
    """Adapt, count, evaluate, train to W weight steps after the base, evaluate again."""
    train_data, val, test = data
    print(f"[seed {seed}] [{method}] adapting", flush=True)
    start = time.perf_counter()
    model, note, search_steps = candidate(method, base, ex, train_data, args, seed)
    adapt_s, w = time.perf_counter() - start, args.search_steps + args.ft_steps
    ft_steps = args.base_steps + w if method == "scratch" else w - search_steps
    row = {"macs": count_macs(model, ex), "params": sum(p.numel() for p in model.parameters()),
           "adapt_s": adapt_s, "note": note, "moved": moved(model), "search_steps": search_steps,
           "finetune_steps": ft_steps,
           "steps_after_base": w if method == "scratch" else search_steps + ft_steps,
           "val_before": perplexity(model, val, args.eval_windows),
           "test_before": perplexity(model, test, args.eval_windows)}
    print(f"[seed {seed}] [{method}] val ppl {row['val_before']:.2f}; training {ft_steps} steps", flush=True)
    lr = args.base_lr if method == "scratch" else args.ft_lr
    row["finetune_s"] = train(model, train_data, ft_steps, lr, seed=1000 + seed)
    row["val"], row["test"] = perplexity(model, val, args.eval_windows), \
            perplexity(model, test, args.eval_windows)
    return row


# ---------------------------------------------------------------- cache
SETTINGS = ("base_steps", "base_lr", "ft_steps", "ft_lr", "search_steps", "dna_windows", "eval_windows")


def config_hash(args, method: str) -> str:
    """Every setting that defines ``method``'s row (the base's settings for "base"), defaults included."""
    keys = ("base_steps", "base_lr") if method == "base" else SETTINGS
    payload = {"protocol": PROTOCOL, "seq": SEQ, "batch": BATCH, "model": CONFIG, "method": method,
               "settings": {k: getattr(args, k) for k in keys},
               "search": stable(search_config(args, 0)) if method == "dna" else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return list({(r["method"], r["seed"], r["config_hash"]): r for r in rows}.values())


def run_seed(seed: int, data, args, path: Path) -> None:
    ex = {"input_ids": data[1][:SEQ][None]}
    base, base_s = base_model(args, data[0], seed)
    for method in ("base",) + METHODS:
        h = config_hash(args, method)
        if any(r["method"] == method and r["seed"] == seed and r["config_hash"] == h
               for r in load_rows(path)):
            continue
        row = {"method": method, "seed": seed, "config_hash": h}
        if method == "base":
            row |= {"macs": count_macs(base, ex), "params": sum(p.numel() for p in base.parameters()),
                    "val": perplexity(base, data[1], args.eval_windows), "train_s": base_s,
                    "test": perplexity(base, data[2], args.eval_windows)}
        else:
            try:
                row |= run_row(method, seed, base, ex, data, args)
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


def _by(rows, key: str) -> dict:
    """{method: {seed: row[key]}}."""
    out = {}
    for r in rows:
        out.setdefault(r["method"], {})[r["seed"]] = r[key]
    return out


def paired(test: dict, ref: str) -> dict:
    """{method: [test ppl - ref's test ppl, seed by seed]}."""
    return {m: [v[s] - test[ref][s] for s in sorted(set(v) & set(test[ref]))] for m, v in test.items()}


def report(rows: list[dict]) -> str:
    test, val = _by(rows, "test"), _by(rows, "val")
    best = {name: min((m for m in pool if m in val), key=lambda m: statistics.mean(val[m].values()),
                      default=None)
            for name, pool in (("all", BASELINES), ("inherited", INHERITED))}
    full = statistics.mean(r["macs"] for r in rows if r["method"] == "base")
    lines = ["| method | MACs ratio | weight steps after the base (search + fine-tune) | test ppl before | "
             "val ppl | test ppl (n) | − best baseline | − best inherited | search s / FT s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    diffs = {k: paired(test, b) if b else {} for k, b in best.items()}
    for m in ("base",) + METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        r0 = rs[0]
        steps = ("-" if m == "base" else f"from init {r0['finetune_steps']} = base + {r0['steps_after_base']}"
                 if m == "scratch"
                 else f"{r0['search_steps']} + {r0['finetune_steps']} = {r0['steps_after_base']}")
        d = [("reference" if m == best[k] else _ci(diffs[k][m], "+") if diffs[k].get(m) and m != "base"
              else "")
             for k in ("all", "inherited")]
        t = (f"{statistics.mean(r['adapt_s'] for r in rs):.1f} / "
             f"{statistics.mean(r['finetune_s'] for r in rs):.1f}"
             if m != "base" else "")
        before = f"{statistics.mean(r['test_before'] for r in rs):.2f}" if m != "base" else ""
        lines.append(f"| {LABELS.get(m, m)} | {statistics.mean(r['macs'] for r in rs) / full:.3f} | {steps} "
                     f"| {before} | {_ci(list(val[m].values()))} | {_ci(list(test[m].values()))} "
                     f"({len(rs)}) | {d[0]} | {d[1]} | {t} |")
    return (f"best baseline on val: {best['all']}; best inherited-weight baseline on val: "
            f"{best['inherited']}\n\n"
            + "\n".join(lines))


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--ft-steps", type=int, default=250, help="F: DNA's fine-tune; the others get S + F")
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--search-steps", type=int, default=150, help="S: DNA's search steps (weight steps)")
    ap.add_argument("--dna-windows", type=int, default=4096)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only print the table from the cache")
    ap.add_argument("--out", default=str(CACHE / "lm_quality_rows.jsonl"))
    return ap.parse_args(argv)


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
    rows = [r for r in load_rows(path) if r["seed"] in seeds
            and r["config_hash"] == config_hash(args, r["method"])]
    text = report(rows)
    (CACHE / "lm_quality.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
