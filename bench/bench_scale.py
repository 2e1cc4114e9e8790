"""DNA search throughput at 1 and N processes (torch.distributed, Gloo on CPU / NCCL on GPU), same global
batch.

Run:  python bench/bench_scale.py                      (1 and 2 CPU processes, global batch 64, 8 steps)
      python bench/bench_scale.py --procs 1,2,4 --threads 2
      python bench/bench_scale.py --device cuda --procs 1   (one GPU, where available)

Each process is launched as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), builds the
supernet of the bundled example (``fxadapt.examples.example_model``, 3x32x32 random inputs, 10 classes),
runs two untimed search steps and then times ``--steps`` alternating weight + gate steps (``run_search``
with the sharded ``Batches`` and one all_reduce per step). Prints steps/s, speed-up over one process and
scaling efficiency (speed-up / processes). On a machine with fewer free cores than processes x threads
the efficiency measures the contention, not fxadapt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    import fxadapt
    from fxadapt import dist
    from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
    from fxadapt.search.dna import SearchConfig, run_search
    from fxadapt.search.supernet import build_supernet
    from fxadapt.train.data import Batches

    ctx = dist.setup(args.device, args.precision)
    a = fxadapt.analyze(example_model(), (torch.randn(EXAMPLE_INPUT_SHAPE),))
    sn = build_supernet(a)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(1024, 3, 32, 32, generator=g), torch.randint(0, 10, (1024,), generator=g))
    train, val = (Batches(data, args.batch, s, ctx.rank, ctx.world) for s in (0, 1))
    cfg = SearchConfig(steps=2, warmup=0, batch_size=args.batch, progress=False)   # device, precision: ctx
    run_search(sn, train, val, 0.5 * a.macs(), False, cfg, ctx)
    dist.barrier(ctx)
    t0 = time.perf_counter()
    run_search(sn, train, val, 0.5 * a.macs(), False, dataclasses.replace(cfg, steps=args.steps), ctx)
    if str(ctx.device).startswith("cuda"):
        torch.cuda.synchronize()
    dist.barrier(ctx)
    seconds = time.perf_counter() - t0
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "seconds": seconds, "steps": args.steps}, f)
    if ctx.active:
        torch.distributed.destroy_process_group()


def measure(world: int, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "result.json")
    mp.start_processes(_worker, args=(world, port, args, out), nprocs=world, join=True, start_method="spawn")
    with open(out) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", default="1,2", help="process counts to measure (default 1,2)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64, help="global batch (split over the processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per process)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CUDA), bf16, fp32")
    args = p.parse_args(argv)
    rows, base = [], None
    for world in (int(w) for w in args.procs.split(",")):
        r = measure(world, args)
        rate = r["steps"] / r["seconds"]
        base = base or rate
        speedup = rate / base
        rows.append((world, args.batch, args.batch // world, rate, speedup, speedup / world))
        print(f"procs {world}: {rate:.3f} steps/s", file=sys.stderr, flush=True)
    print(f"device {args.device}, {args.threads} thread(s)/process, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs\n")
    print("| processes | global batch | per-rank batch | steps/s | speed-up | efficiency |")
    print("|----------:|-------------:|---------------:|--------:|---------:|-----------:|")
    for w, gb, rb, rate, sp, eff in rows:
        print(f"| {w} | {gb} | {rb} | {rate:.3f} | {sp:.2f}x | {eff:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
