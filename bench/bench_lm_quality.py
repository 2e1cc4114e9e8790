"""LM quality row (issue 8, item 7): a small GPT-2 trained on the standard library's sources, adapted to 0.5
of its MACs three ways, every candidate given the same short fine-tune; held-out perplexity before and after.

    python bench/bench_lm_quality.py [--base-steps 900] [--ft-steps 400] [--dna-steps 300] [--fresh]

Corpus: ``Path(os.__file__).parent.glob("*.py")`` in sorted name order, concatenated as bytes (byte-level
vocabulary, V = 256); the last 5% of the bytes are held out. Perplexity is ``exp`` of the mean next-byte
cross-entropy over non-overlapping windows of ``SEQ`` bytes spread evenly over the held-out slice.

Candidates, all at the MACs of (a) by ``fxadapt.analysis.count.count_macs`` on ``{"input_ids": [1, SEQ]}``:
  (a) ``fxadapt.transform(model, 0.5, ...)`` data-free (default attention mode) and, for a like-for-like
      comparison with (c), the same with ``attention="heads"``; and the unadapted base as a reference;
  (b) fxadapt DNA search on training windows (``SearchConfig(loss_fn=lm_loss)``); if the search cannot take
      the model's ``CausalLMOutput`` the error is recorded and the search runs on a wrapper returning logits;
  (c) the Torch-Pruning LLM recipe by hand (TP 1.6 has no pruner for HF's ``Conv1D``: ``MetaPruner`` with
      ``num_heads``/``prune_num_heads=True`` on this model runs and removes nothing): per layer, whole heads ranked by the L1 norm of their q/k/v columns and
      output-projection rows, MLP neurons by the L1 norm of their c_fc column and c_proj row; one uniform
      ratio ``p`` for both (heads kept: ``round(H (1 - p))``), found by bisection to the MACs of (a).

Fine-tune (identical for every candidate): AdamW, ``lr`` with linear warm-up then cosine to 0, batch 16,
the same window offsets in the same order. Results are cached per row in ``bench/.cache/lm_quality.json``
(a rerun skips finished rows; ``--fresh`` recomputes), the trained base in ``bench/.cache/lm_base_*.pt`` and
the DNA search checkpoint in ``bench/.cache/lm_dna_*.ckpt``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxadapt
from fxadapt.analysis.count import count_macs
from fxadapt.search.dna import SearchConfig

CACHE = Path(__file__).resolve().parent / ".cache"
SEQ, BATCH, VOCAB = 128, 16, 256
CONFIG = dict(n_layer=4, n_embd=128, n_head=4, n_positions=SEQ, vocab_size=VOCAB,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)


# ---------------------------------------------------------------- data
def corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tensors: the stdlib's top-level ``*.py`` files, sorted, last 5% held out."""
    files = sorted(Path(os.__file__).parent.glob("*.py"), key=lambda p: p.name)
    data = torch.frombuffer(bytearray(b"\n".join(p.read_bytes() for p in files)), dtype=torch.uint8).long()
    cut = int(len(data) * 0.95)
    return data[:cut], data[cut:]


def windows(data: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = offsets[:, None] + torch.arange(SEQ + 1)
    w = data[idx]
    return w[:, :-1], w[:, 1:]


def random_offsets(data: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(data) - SEQ - 1, (n,), generator=g)


def heldout_offsets(data: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` non-overlapping windows spread evenly over the held-out slice."""
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
    """AdamW, linear warm-up (5%) then cosine to 0, batch ``BATCH``, offsets drawn from ``seed``; wall seconds."""
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
        if s % 100 == 0 or s == steps - 1:
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


def base_model(args, train_data: torch.Tensor) -> tuple[nn.Module, float]:
    """The trained base (cached by its settings), and its training wall time."""
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(**CONFIG))
    path = CACHE / f"lm_base_s{args.base_steps}_lr{args.base_lr}.pt"
    if path.exists() and not args.fresh:
        ck = torch.load(path, weights_only=True)
        model.load_state_dict(ck["state"])
        return model, ck["seconds"]
    print(f"training base GPT-2 for {args.base_steps} steps", flush=True)
    seconds = train(model, train_data, args.base_steps, args.base_lr, seed=0)
    torch.save({"state": model.state_dict(), "seconds": seconds}, path)
    return model, seconds


# ---------------------------------------------------------------- Torch-Pruning LLM recipe, by hand
def _conv1d(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(weight.shape[1], weight.shape[0])
    layer.weight.data, layer.bias.data = weight.clone(), bias.clone()
    return layer


def _prune_heads(attn: nn.Module, keep: int) -> None:
    """Keep the ``keep`` heads of largest L1 norm (q/k/v columns + c_proj rows); head_dim unchanged."""
    e, hd, h = attn.embed_dim, attn.head_dim, attn.num_heads
    w, p = attn.c_attn.weight, attn.c_proj.weight                     # Conv1D: [in, out]
    cols = torch.arange(3 * e).view(3, h, hd)                           # [q|k|v] x head x head_dim
    score = w.abs()[:, cols].sum(dim=(0, 1, 3)) + p.abs().view(h, hd, e).sum(dim=(1, 2))
    heads = score.topk(keep).indices.sort().values
    kept = cols[:, heads].flatten()
    attn.c_attn = _conv1d(w[:, kept], attn.c_attn.bias[kept])
    rows = cols[0, heads].flatten()
    attn.c_proj = _conv1d(p[rows], attn.c_proj.bias)
    attn.num_heads, attn.split_size = keep, keep * hd


def _prune_mlp(mlp: nn.Module, keep: int) -> None:
    """Keep the ``keep`` neurons of largest L1 norm (c_fc column + c_proj row)."""
    fc, proj = mlp.c_fc.weight, mlp.c_proj.weight
    idx = (fc.abs().sum(0) + proj.abs().sum(1)).topk(keep).indices.sort().values
    mlp.c_fc = _conv1d(fc[:, idx], mlp.c_fc.bias[idx])
    mlp.c_proj = _conv1d(proj[idx], mlp.c_proj.bias)


@torch.no_grad()
def magnitude_prune(model: nn.Module, p: float) -> nn.Module:
    """Uniform ratio ``p`` per layer: heads kept ``max(1, round(H (1 - p)))``, MLP neurons ``round(4E (1 - p))``."""
    out = copy.deepcopy(model)
    for block in out.transformer.h:
        h, inner = block.attn.num_heads, block.mlp.c_fc.weight.shape[1]
        _prune_heads(block.attn, max(1, round(h * (1 - p))))
        _prune_mlp(block.mlp, max(1, round(inner * (1 - p))))
    return out


def magnitude_at(model: nn.Module, target: float, ex: dict, iters: int = 30) -> tuple[nn.Module, float]:
    """Bisection on ``p`` (MACs fall with ``p``): the pruned model whose MACs are closest to ``target``."""
    lo, hi = 0.0, 0.99
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_macs(magnitude_prune(model, mid), ex) > target else (lo, mid)
    best = min((lo, hi), key=lambda q: abs(count_macs(magnitude_prune(model, q), ex) - target))
    return magnitude_prune(model, best), best


# ---------------------------------------------------------------- candidates
def adapt_datafree(base, ex, train_data, args, **options):
    return fxadapt.transform(base, 0.5, ex, **options), None


def adapt_dna(base, ex, train_data, args):
    """DNA on the model as is; if the search cannot take its output, record why and search ``Logits(base)``."""
    x, y = windows(train_data, random_offsets(train_data, args.dna_windows, seed=2))
    xv, yv = windows(train_data, random_offsets(train_data, 256, seed=3))
    search = SearchConfig(loss_fn=lm_loss, batch_size=BATCH, steps=args.dna_steps,
                          warmup=max(1, args.dna_steps // 6), progress=False)
    tag = f"s{args.base_steps}_d{args.dna_steps}"
    kw = dict(data=(x, y), val_data=(xv, yv), strategy="dna")
    try:
        ck = dataclasses.replace(search, checkpoint=str(CACHE / f"lm_dna_raw_{tag}.ckpt"))
        return fxadapt.transform(base, 0.5, ex, search=ck, **kw), None
    except Exception as e:  # noqa: BLE001  (recorded in the row, then worked around)
        error = f"{type(e).__name__}: {e}"
        print(f"    DNA on GPT2LMHeadModel failed: {error}; retrying on Logits(model)", flush=True)
    ck = dataclasses.replace(search, checkpoint=str(CACHE / f"lm_dna_logits_{tag}.ckpt"))
    return fxadapt.transform(Logits(base), 0.5, ex, search=ck, **kw), f"searched on Logits(model); as is: {error}"


def adapt_magnitude(base, ex, train_data, args, target: float):
    model, p = magnitude_at(base, target, ex)
    heads = [b.attn.num_heads for b in model.transformer.h]
    inner = [b.mlp.c_fc.weight.shape[1] for b in model.transformer.h]
    return model, f"by hand (L1 magnitude), p={p:.4f}, heads/layer {heads}, MLP {inner}"


CANDIDATES = {
    "base + same fine-tune": lambda b, ex, d, a, rows: (copy.deepcopy(b), "reference: no adaptation"),
    "fxadapt data-free": lambda b, ex, d, a, rows: adapt_datafree(b, ex, d, a),
    "fxadapt data-free (heads)": lambda b, ex, d, a, rows: adapt_datafree(b, ex, d, a, attention="heads"),
    "fxadapt DNA": lambda b, ex, d, a, rows: adapt_dna(b, ex, d, a),
    "magnitude heads+MLP (TP LLM recipe)":
        lambda b, ex, d, a, rows: adapt_magnitude(b, ex, d, a, rows["fxadapt data-free"]["macs"]),
}


def moved(model: nn.Module) -> list | None:
    """``[group, before, after]`` for every group fxadapt's report says moved (``None``: not an fxadapt result)."""
    try:
        rep = fxadapt.report(model)
    except Exception:  # noqa: BLE001  (no report attached)
        return None
    return [[c.name, c.before, c.after] for c in rep.groups if c.before != c.after]


def run_candidate(name, base, ex, data, args, rows) -> dict:
    """Adapt, count, evaluate, fine-tune, evaluate again (``data`` = (train, held-out))."""
    train_data, held = data
    print(f"[{name}] adapting", flush=True)
    start = time.perf_counter()
    try:
        model, note = CANDIDATES[name](base, ex, train_data, args, rows)
    except Exception as e:  # noqa: BLE001  (a failing method is a row, not a crash)
        return {"error": f"{type(e).__name__}: {e}"}
    adapt_s = time.perf_counter() - start
    row = {"macs": count_macs(model, ex), "params": sum(p.numel() for p in model.parameters()),
           "adapt_s": adapt_s, "note": note, "moved": moved(model), "ppl_before": perplexity(model, held, args.eval_windows)}
    print(f"[{name}] ppl {row['ppl_before']:.2f}; fine-tuning {args.ft_steps} steps", flush=True)
    row["finetune_s"] = train(model, train_data, args.ft_steps, args.ft_lr, seed=1)
    row["ppl_after"] = perplexity(model, held, args.eval_windows)
    return row


# ---------------------------------------------------------------- report
def table(results: dict) -> str:
    full = results["rows"]["base"]["macs"]
    lines = ["| model | MACs ratio | params | ppl before FT | ppl after FT | adapt s | FT s | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | - | failed: {r['error']} |")
            continue
        after = f"{r['ppl_after']:.2f}" if r.get("ppl_after") is not None else "-"
        ft = f"{r['finetune_s']:.0f}" if r.get("finetune_s") is not None else "-"
        lines.append(f"| {name} | {r['macs'] / full:.3f} | {r['params'] / 1e3:.0f}K | {r['ppl_before']:.2f} | "
                     f"{after} | {r['adapt_s']:.1f} | {ft} | {r.get('note') or ''} |")
    return "\n".join(lines)


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-steps", type=int, default=900)
    ap.add_argument("--base-lr", type=float, default=3e-3)
    ap.add_argument("--ft-steps", type=int, default=400)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--dna-steps", type=int, default=300)
    ap.add_argument("--dna-windows", type=int, default=4096)
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(CACHE / "lm_quality.json"))
    ap.add_argument("--fresh", action="store_true", help="recompute the base and every row")
    return ap.parse_args()


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*use_cache.*")
    CACHE.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("threads", "out", "fresh")}
    results = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "rows": {}}
    data = corpus()
    ex = {"input_ids": data[1][:SEQ][None]}
    base, base_s = base_model(args, data[0])
    results["rows"]["base"] = {"macs": count_macs(base, ex), "params": sum(p.numel() for p in base.parameters()),
                               "adapt_s": 0.0, "ppl_before": perplexity(base, data[1], args.eval_windows),
                               "note": f"trained {args.base_steps} steps in {base_s:.0f} s"}
    for name in CANDIDATES:
        if name not in results["rows"] or "error" in results["rows"][name]:
            results["rows"][name] = run_candidate(name, base, ex, data, args, results["rows"])
            out.write_text(json.dumps(results, indent=1))
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
