"""Benchmark: ``fxadapt.transform`` (data-free, 0.5 of the MACs) next to Torch-Pruning's prune, same run.

For each pytorchcv model (1x3x224x224, eval mode, random weights), interleaved, ``--repeats`` times:

- ``fxadapt``: ``fxadapt.transform(model, 0.5, (x,))`` end to end (capture, analysis, solve, materialize,
  rewire, verify — the verification runs the model and counts its MACs independently); the per-step
  split is taken from the report's ``timings``;
- ``tp``: ``torch_pruning.pruner.MagnitudePruner(model, x, pruning_ratio=0.5, ignored_layers=[classifier])
  .step()`` on a deep copy (dependency graph build + pruning; no verification).

Prints medians and the ratio fxadapt / TP (issue 7 target: at most 2x), of wall seconds and of this
process' CPU seconds (``time.process_time``: comparable on a busy machine, where wall time also counts other
processes' turns). Each timed call starts from a full ``gc.collect()`` (untimed): a run pays for the
collections its own garbage causes, not for a full collection that earlier runs' garbage left due (~0.25 s
on these models' heap, in about half the runs otherwise). Run with ``--threads 1`` on a loaded machine::

    python bench/bench_transform.py [--models resnet50,mobilenetv2_w1] [--repeats 3] [--threads 1]

``--llama LAYERS`` measures time and memory on a Llama-3.2-1B-shaped model instead (hidden 2048, MLP 8192, 32
heads / 8 KV heads, vocabulary 128256, tied embeddings, bfloat16, random weights; ``LAYERS`` decoder
layers, 16 for the 1B shape: ~2.3 GiB), data-free to 0.5 of the MACs on 1x16 tokens. Each tool runs in
its own process (``--tool``), which builds the model, resets its peak-RSS mark (``/proc/self/clear_refs``)
and reports wall seconds and the peak RSS above the built model (``VmHWM`` minus ``VmRSS`` after the
build): fxadapt ``transform`` (the input model is kept, the result is a second model) and Torch-Pruning's
LLM recipe (``MetaPruner`` with ``num_heads``, ``prune_num_heads=True``, ``GroupMagnitudeImportance``, the
``lm_head`` ignored, ``round_to=4`` as in its ``examples/LLMs/prune_llm.py``; ``pruning_ratio=0.3`` of
hidden and MLP channels and heads: hidden 1432, MLP 5732, 16 query / 8 KV heads, so 0.63 of the MACs at 2
layers (FlopCounterMode) and by the same widths 0.59 at 4, 0.52 at 16: the vocabulary-wide ``lm_head`` keeps
its rows; in place). TP traces the model with ``use_cache=False``: from transformers 5 on, the default
forward builds a ``DynamicCache`` whose first ``update`` is ``torch.cat([empty, keys], -2)`` (4.x assigned
the keys, no op); TP 1.6.1 reads these cats as channel concatenations whose offsets shift the key/value
channel indices on every pass around the q-k-v attention cycle, so its ``get_pruning_group`` never closes
the group (a hang in ``get_all_groups``, the group growing). The cache plays no part in a one-pass prune,
so this is TP's recipe as it runs on transformers 4.x::

    python bench/bench_transform.py --llama 16 [--repeats 1]
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import statistics
import time

import torch

import fxadapt

MODELS = {
    "resnet50": ("pytorchcv.models.resnet", "resnet50"),
    "mobilenetv2_w1": ("pytorchcv.models.mobilenetv2", "mobilenetv2_w1"),
}


def load(name: str):
    module, factory = MODELS[name]
    torch.manual_seed(0)
    return getattr(importlib.import_module(module), factory)().eval(), torch.randn(1, 3, 224, 224)


def run_fxadapt(model, x) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds and the report's per-step split of one ``transform``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fxadapt.transform(model, 0.5, (x,))
    return time.perf_counter() - t0, time.process_time() - c0, dict(fxadapt.report(out).timings)


def run_tp(model, x) -> tuple[float, float]:
    """Wall and CPU seconds of Torch-Pruning's prune of a deep copy."""
    import torch_pruning as tp

    t0, c0 = time.perf_counter(), time.process_time()
    m = copy.deepcopy(model)
    head = [mod for mod in m.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))][-1:]
    tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                              ignored_layers=head).step()
    return time.perf_counter() - t0, time.process_time() - c0


def _status(key: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in GiB (Linux)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    return kib / 2**20


def llama(layers: int):
    import transformers as T

    T.logging.set_verbosity_error()
    cfg = T.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                        max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device("meta"):   # no slow fp32 init: built empty, filled in bfloat16 (every page touched)
        model = T.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.uniform_(-0.03, 0.03)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # its buffers computed, not empty
    model.tie_weights()   # to_empty made lm_head a tensor of its own
    return model, {"input_ids": torch.randint(0, 128256, (1, 16))}


def run_tp_llm(model, inputs) -> None:
    import torch_pruning as tp

    c = model.config
    heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads.update({m.q_proj: c.num_attention_heads, m.k_proj: c.num_key_value_heads,
                          m.v_proj: c.num_key_value_heads})
    traced = {"input_ids": inputs["input_ids"], "use_cache": False}   # no KV-cache cat: see the docstring
    tp.pruner.MetaPruner(model, example_inputs=traced,
                         importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                         pruning_ratio=0.3, ignored_layers=[model.lm_head], num_heads=heads,
                         prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.3, round_to=4,
                         output_transform=lambda x: x.logits).step()


def one_llm(tool: str, layers: int) -> dict:
    """Build the Llama, then time one tool on it: wall, peak RSS above the built model (module docstring)."""
    import gc

    model, inputs = llama(layers)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    size = sum(t.numel() * t.element_size() for t in tensors)
    gc.collect()
    built = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset VmHWM to the current RSS
    t0, c0 = time.perf_counter(), time.process_time()
    if tool == "fxadapt":
        fxadapt.transform(model, 0.5, inputs)   # the result (a second model) exists at return: in the peak
    else:
        run_tp_llm(model, inputs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0   # CPU s: comparable on a busy machine
    peak = _status("VmHWM")
    return {"tool": tool, "wall": wall, "cpu": cpu, "model_gib": size / 2**30, "built_gib": built,
            "above_gib": peak - built}


def main_llm(args) -> int:
    import json
    import subprocess
    import sys

    rows = []
    for _ in range(args.repeats):
        for tool in ("fxadapt", "tp"):
            cmd = [sys.executable, __file__, "--tool", tool, "--llama", str(args.llama),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"Llama-3.2-1B-shaped, {args.llama} layers, bfloat16, 0.5 data-free; one process per tool\n")
    print("| tool | wall s | CPU s | model GiB | peak RSS above the built model GiB | above / model |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tool']} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['model_gib']:.2f} | "
              f"{r['above_gib']:.2f} | {r['above_gib'] / r['model_gib']:.2f}x |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--llama", type=int, default=0, help="decoder layers of the Llama-1B-shaped memory run")
    p.add_argument("--tool", choices=("fxadapt", "tp"), help="(internal) one tool in this process")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tool:
        import json

        print(json.dumps(one_llm(args.tool, args.llama)))
        return 0
    if args.llama:
        return main_llm(args)
    rows = []
    for name in args.models.split(","):
        model, x = load(name)
        run_fxadapt(model, x), run_tp(model, x)  # warm-up (imports, first export)
        ours, theirs, steps = [], [], []
        for _ in range(args.repeats):
            gc.collect()
            t, cpu, split = run_fxadapt(model, x)
            ours.append((t, cpu))
            steps.append(split)
            gc.collect()
            theirs.append(run_tp(model, x))
        split = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
        rows.append((name, med(ours, 0), med(theirs, 0), med(ours, 1), med(theirs, 1), split))
    print("| model | fxadapt transform s | TP prune s | ratio | fxadapt CPU s | TP CPU s | CPU ratio "
          "| fxadapt steps (median s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, a, b, ca, cb, split in rows:
        steps = ", ".join(f"{k} {v:.2f}" for k, v in split.items())
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} | {ca:.2f} | {cb:.2f} | {ca / cb:.2f} | {steps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
