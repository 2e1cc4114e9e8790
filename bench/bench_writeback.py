"""Does the adapted model still work as the user's model? One row per check, one column per model.

    python bench/bench_writeback.py [--budgets 0.5 1.5] [--models llama-gqa gpt2 ...]

Checks (each against an independent reference: the original model, stock ``from_pretrained``, the count):
same class; runs at another batch size and sequence length / image size; ``generate`` (causal LMs);
grown 1.5x generates the original's greedy tokens; ``labels=`` loss backpropagates; stock
``save_pretrained``/``from_pretrained`` reproduces the logits (when the config can state the sizes);
``fxadapt.from_pretrained`` (recipe) reproduces them; ``config`` states the embedding width. Prints a
markdown table and writes ``bench/.cache/bench_writeback.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import fxadapt

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _models():
    import bench_transformers as bt
    import transformers as T

    T.logging.set_verbosity_error()
    cases = {k: v for k, v in bt._models().items() if k in ("bert", "gpt2", "llama-gqa", "qwen2-gqa", "vit")}
    cases["mistral"] = (lambda: T.MistralForCausalLM(T.MistralConfig(vocab_size=bt.VOCAB, num_key_value_heads=2,
                                                                     **bt.SMALL)), bt._tokens)
    from pytorchcv.models.resnet import resnet18

    cases["resnet18"] = (lambda: resnet18(num_classes=10), lambda: (torch.randn(1, 3, 224, 224),))
    return cases


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _other(inputs, model):
    """Another batch size and sequence length; for images another size where the original runs there."""
    if isinstance(inputs, dict):
        ids = torch.randint(0, 100, (3, 13))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    x = inputs[0]
    smaller = (torch.randn(3, *x.shape[1:-2], x.shape[-2] * 3 // 4, x.shape[-1] * 3 // 4),)
    try:
        with torch.no_grad():
            model(*smaller)
        return smaller
    except Exception:  # noqa: BLE001 - a fixed image size (ViT): another batch size only
        return (torch.randn(3, *x.shape[1:]),)


def _call(m, inputs):
    return m(**inputs) if isinstance(inputs, dict) else m(*inputs)


def checks(name, build, make, budget) -> dict:
    torch.manual_seed(0)
    model, inputs = build().eval(), make()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fxadapt.transform(model, budget, inputs)
    row = {"class": type(out) is type(model),
           "fallback": [str(x.message)[:200] for x in w if issubclass(x.category, fxadapt.WriteBackWarning)]}
    other = _other(inputs, model)
    try:
        row["other shapes"] = tuple(_logits(_call(out, other)).shape)[0] == 3
    except Exception as e:  # noqa: BLE001
        row["other shapes"] = f"no: {type(e).__name__}"
    hf = hasattr(out, "save_pretrained") and hasattr(out, "config")
    if hf and hasattr(out, "generate") and "CausalLM" in type(out).__name__ or "LMHead" in type(out).__name__:
        ids = other["input_ids"][:1, :5]
        gen = out.generate(ids, max_new_tokens=6, do_sample=False)
        row["generate"] = gen.shape == (1, 11)
        if budget > 1:
            row["grown = original tokens"] = torch.equal(gen, model.generate(ids, max_new_tokens=6, do_sample=False))
        loss = out(other["input_ids"], labels=other["input_ids"]).loss
        loss.backward()
        row["labels= loss"] = bool(torch.isfinite(loss))
    if hf:
        with tempfile.TemporaryDirectory() as d:
            out.save_pretrained(d)
            ref = _logits(_call(out.eval(), other))
            again = fxadapt.from_pretrained(d).eval()
            row["fxadapt round trip"] = torch.allclose(_logits(_call(again, other)), ref, atol=1e-5)
            uniform = getattr(out.config, "fxadapt_recipe", None) is None
            if uniform:
                stock = type(out).from_pretrained(d).eval()
                row["stock round trip"] = torch.allclose(_logits(_call(stock, other)), ref, atol=1e-5)
            else:
                row["stock round trip"] = "n/a (heterogeneous)"
        emb = getattr(out.get_input_embeddings(), "weight", None)
        emb = emb.shape[-1] if emb is not None else next(m.out_channels for m in out.modules() if hasattr(m, "out_channels"))
        row["config fields"] = out.config.hidden_size == emb
    return row


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.5])
    ap.add_argument("--models", nargs="+", default=None)
    args = ap.parse_args(argv)
    cases = _models()
    results = {}
    for name in args.models or list(cases):
        for b in args.budgets:
            results[f"{name} {b}"] = row = checks(name, *cases[name], b)
            print(name, b, row, flush=True)
    keys = sorted({k for r in results.values() for k in r if k != "fallback"})
    print("| check | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(str(r.get(k, "")) for r in results.values()) + " |")
    cache = Path(__file__).resolve().parent / ".cache"
    cache.mkdir(exist_ok=True)
    (cache / "bench_writeback.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
