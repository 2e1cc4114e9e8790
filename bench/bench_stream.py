"""Streaming a Llama checkpoint bigger than half the machine (issue 26, item 3).

    python bench/bench_stream.py write /tmp/llama7b [--shape 7b]     # random bf16 weights, shard by shard
    /usr/bin/time -v fxadapt adapt /tmp/llama7b --budget 0.5 -o /tmp/llama7b-half --stream
    python bench/bench_stream.py generate /tmp/llama7b-half          # load once (bf16), a few greedy tokens
    python bench/bench_stream.py compare [--shape 1b]           # streamed == in-memory transform, bit for bit
    /usr/bin/time -v python bench/bench_stream.py adapt /tmp/llama7b -o /tmp/llama7b-data --data 4,8,128
                    # streamed with calibration data: 4 batches of 8 x 128 random token ids (item 4)

``write`` never builds the model: every tensor of the config's state dict (names and shapes from a meta
model) is drawn (normal, std 0.02; RMSNorm weights 1), written into its shard and freed. ``compare``
writes a smaller Llama the same way, streams it at 0.5 and runs the in-memory ``transform`` +
``save_pretrained`` on the loaded model, then checks every tensor, the config and the logits; it prints
both paths' wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import transformers

import fxadapt
from fxadapt.export.shards import Checkpoint, nbytes, shard_bytes, shards, write_shard

SHAPES = {   # hidden, layers, heads, kv heads, intermediate, vocab
    "7b": (4096, 32, 32, 32, 11008, 32000),
    "1b": (2048, 16, 32, 8, 8192, 32000),
    "tiny": (256, 4, 8, 4, 688, 1000),
}


def llama_config(shape: str) -> transformers.LlamaConfig:
    h, n, heads, kv, inter, vocab = SHAPES[shape]
    return transformers.LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                                    num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                                    rms_norm_eps=1e-5, max_position_embeddings=4096, dtype="bfloat16",
                                    architectures=["LlamaForCausalLM"])


def write(path: str, shape: str, max_shard: str = "2GB") -> None:
    """A random bf16 Llama checkpoint in ``path``, written tensor by tensor (never the whole model)."""
    cfg = llama_config(shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    specs = {k: (torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()}
    parts = shards({k: nbytes(*v) for k, v in specs.items()}, shard_bytes(max_shard))
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def draw(key: str) -> torch.Tensor:
        shp = specs[key][1]
        if key.endswith("norm.weight"):
            return torch.ones(shp, dtype=torch.bfloat16)
        return (torch.randn(shp, generator=gen) * 0.02).to(torch.bfloat16)

    for i, (name, keys) in enumerate(zip(names, parts)):
        write_shard(os.path.join(path, name), keys, specs, draw)
        print(f"wrote {name} ({i + 1}/{len(parts)})", flush=True)
    index = {"metadata": {"total_size": sum(nbytes(*v) for v in specs.values())},
             "weight_map": {k: n for n, keys in zip(names, parts) for k in keys}}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    cfg.save_pretrained(path)
    print(f"{path}: {index['metadata']['total_size'] / 2**30:.2f} GiB in {len(parts)} shards")


def generate(path: str, tokens: int = 8) -> None:
    """Load the adapted checkpoint once (bf16) and generate a few greedy tokens."""
    t = time.perf_counter()
    cfg = json.load(open(os.path.join(path, "config.json")))
    load = fxadapt.from_pretrained if cfg.get("fxadapt_recipe") else \
        transformers.AutoModelForCausalLM.from_pretrained
    model = load(path).eval()
    loaded = time.perf_counter() - t
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    print(f"loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, "
          f"{next(model.parameters()).dtype}) in {loaded:.1f} s; generated {out.shape[1] - ids.shape[1]} "
          f"tokens in {time.perf_counter() - t:.1f} s: {out[0, ids.shape[1]:].tolist()}")


def compare(shape: str, layers: str = "any") -> bool:
    """Streamed vs in-memory on one checkpoint: every tensor, config.json and the logits equal."""
    root = tempfile.mkdtemp(prefix="bench_stream_")
    src, streamed, memory = (os.path.join(root, d) for d in ("src", "streamed", "memory"))
    write(src, shape, "500MB")
    t = time.perf_counter()
    fxadapt.adapt_checkpoint(src, 0.5, streamed, layers=layers, max_shard_size="500MB")
    t_stream = time.perf_counter() - t
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    small = fxadapt.transform(model, 0.5, {"input_ids": ids}, layers=layers)
    small.save_pretrained(memory, max_shard_size="500MB")
    t_memory = time.perf_counter() - t
    a, b = Checkpoint(streamed), Checkpoint(memory)
    same = a.entries.keys() == b.entries.keys() and all(torch.equal(a.read(k), b.read(k)) for k in a.entries)
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (streamed, memory))
    load = fxadapt.from_pretrained if ca.get("fxadapt_recipe") else \
        transformers.AutoModelForCausalLM.from_pretrained
    with torch.no_grad():
        logits = torch.equal(load(streamed).eval()(ids).logits, small(ids).logits)
    print(f"compare {shape} layers={layers}: tensors equal {same} ({len(a.entries)}), "
          f"config equal {ca == cb}, logits equal {logits}; streamed {t_stream:.1f} s, in memory "
          f"(load + transform + save) {t_memory:.1f} s")
    shutil.rmtree(root)
    return same and ca == cb and logits


def adapt(src: str, out: str, data: str | None, budget: float = 0.5) -> None:
    """``adapt_checkpoint`` (``data``: ``"n,batch,seq"`` random token ids, seed 0): its wall time and this
    process's peak RSS."""
    import resource

    ids = None
    if data:
        n, b, t = (int(x) for x in data.split(","))
        vocab = transformers.AutoConfig.from_pretrained(src).vocab_size
        ids = torch.randint(0, vocab, (n, b, t), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    res = fxadapt.adapt_checkpoint(src, budget, out, data=ids, progress=True)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"adapt {src} data={data}: MACs ratio {res.macs_after / res.macs_before:.4f}, wall {wall:.1f} s, "
          f"peak RSS {rss:.2f} GiB, {len(res.files)} files in {out}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["write", "generate", "compare", "adapt"])
    p.add_argument("path", nargs="?")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None)
    p.add_argument("--layers", default="any")
    p.add_argument("-o", "--out", help="adapt: the output folder")
    p.add_argument("--data", help="adapt: calibration token ids 'batches,batch,seq' (e.g. 4,8,128)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "write":
        write(args.path, args.shape or "7b")
    elif args.what == "adapt":
        adapt(args.path, args.out, args.data)
    elif args.what == "generate":
        generate(args.path)
    else:
        return 0 if compare(args.shape or "1b", args.layers) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
