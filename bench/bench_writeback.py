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
import copy
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
    cases["mistral"] = (lambda: T.MistralForCausalLM(T.MistralConfig(vocab_size=bt.VOCAB,
                                                                     num_key_value_heads=2, **bt.SMALL)),
                                                                     bt._tokens)
    from pytorchcv.models.resnet import resnet18

    cases["resnet18"] = (lambda: resnet18(num_classes=10), lambda: (torch.randn(1, 3, 224, 224),))
    return cases


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state \
            if hasattr(out, "last_hidden_state") else out


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


def tp_prune(model, inputs, patch: bool):
    """Torch-Pruning 1.6.1 as its LLM example runs it (whole heads with GQA, MLP, hidden size; ratio 0.3),
    with ``patch`` the hand edits of the config and attention attributes that example makes afterwards."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    x = inputs["input_ids"] if isinstance(inputs, dict) else inputs[0]
    heads = {}
    for n, mod in m.named_modules():
        if n.endswith("self_attn") and hasattr(mod, "q_proj"):
            heads[mod.q_proj] = m.config.num_attention_heads
            heads[mod.k_proj] = heads[mod.v_proj] = m.config.num_key_value_heads
    head = getattr(m, "lm_head", None)
    ignored = [head] if head is not None \
            else [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1:]
    kw = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.3) if heads \
            else {}
    tp.pruner.BasePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.3,
                         ignored_layers=ignored, round_to=4,
                         output_transform=(lambda o: o.logits) if hasattr(m, "config") else None, **kw).step()
    if patch and hasattr(m, "config"):
        m.config.hidden_size = m.lm_head.in_features
        for n, mod in m.named_modules():
            if n.endswith("self_attn") and hasattr(mod, "q_proj"):
                mod.num_key_value_groups = mod.q_proj.out_features // mod.k_proj.out_features
                m.config.num_attention_heads = mod.q_proj.out_features // mod.head_dim
                m.config.num_key_value_heads = mod.k_proj.out_features // mod.head_dim
                m.config.head_dim = mod.head_dim
            elif n.endswith("mlp") and hasattr(mod, "gate_proj"):
                m.config.intermediate_size = mod.gate_proj.out_features
    return m


def checks(name, build, make, budget, method="fxadapt", layers="any") -> dict:
    torch.manual_seed(0)
    model, inputs = build().eval(), make()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = (fxadapt.transform(model, budget, inputs, layers=layers) if method == "fxadapt"
               else tp_prune(model, inputs, patch=method == "tp+patch"))
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
        row["generate"] = _try(lambda: out.generate(ids, max_new_tokens=6, do_sample=False).shape == (1, 11))
        if budget > 1:
            row["grown = original tokens"] = torch.equal(out.generate(ids, max_new_tokens=6, do_sample=False),
                                                         model.generate(ids, max_new_tokens=6,
                                                                        do_sample=False))
        row["labels= loss"] = _try(lambda: _loss(out, other["input_ids"]))
    if hf:
        with tempfile.TemporaryDirectory() as d:
            out.save_pretrained(d)
            ref = _logits(_call(out.eval(), other))
            if method == "fxadapt":
                again = fxadapt.from_pretrained(d).eval()
                row["fxadapt round trip"] = torch.allclose(_logits(_call(again, other)), ref, atol=1e-5)
            uniform = getattr(out.config, "fxadapt_recipe", None) is None
            if uniform:
                row["stock round trip"] = _try(lambda: torch.allclose(
                    _logits(_call(type(out).from_pretrained(d).eval(), other)), ref, atol=1e-5))
            else:
                row["stock round trip"] = "n/a (heterogeneous)"
        emb = getattr(out.get_input_embeddings(), "weight", None)
        emb = emb.shape[-1] if emb is not None \
                else next(m.out_channels for m in out.modules() if hasattr(m, "out_channels"))
        row["config fields"] = out.config.hidden_size == emb
    return row


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the check's answer is no, with the error
        return f"no: {type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"


def _loss(out, ids):
    loss = out(ids, labels=ids).loss
    loss.backward()
    return bool(torch.isfinite(loss))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.5])
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--tp", action="store_true",
                    help="also Torch-Pruning (ratio 0.3), as is and hand-patched")
    ap.add_argument("--layers", default="any",
                    help="TransformConfig.layers: any (per-layer widths) or uniform")
    args = ap.parse_args(argv)
    cases = _models()
    results = {}
    for name in args.models or list(cases):
        for b in args.budgets:
            results[f"{name} {b}"] = row = checks(name, *cases[name], b, layers=args.layers)
            print(name, b, row, flush=True)
        for method in ("tp", "tp+patch") if args.tp else ():
            try:
                results[f"{name} {method}"] = row = checks(name, *cases[name], 0.5, method)
            except Exception as e:  # noqa: BLE001 - TP could not prune this model
                results[f"{name} {method}"] = row = {"class": f"no: {type(e).__name__}: {str(e)[:80]}"}
            print(name, method, row, flush=True)
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
