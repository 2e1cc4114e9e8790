"""Distributed search and fine-tuning: two Gloo processes on CPU, launched as torchrun would (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment; fxadapt initialises the process group itself).

Every rank must return the same architecture with bit-identical weights (DNA, FUR, finetune), meet the
budget, and a DNA run interrupted and resumed from its checkpoint must equal the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from models import ResNetTiny

import fxadapt
from fxadapt.pipeline.transform import SearchInterrupted, TransformConfig
from fxadapt.search.dna import SearchConfig
from fxadapt.search.fur import FurConfig

X1 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
WORLD = 2


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 5, (64,), generator=g)


FAST = SearchConfig(steps=10, warmup=3, batch_size=16, progress=False)


def _summary(model) -> dict:
    rep = fxadapt.report(model)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "widths": [c.after for c in rep.groups], "ratio": rep.macs_after / rep.macs_before}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    data, model = _data(), ResNetTiny().eval()
    res = {}
    res["dna"] = _summary(fxadapt.transform(model, 0.5, (X1,), data=data, strategy="dna",
                                            config=TransformConfig(search=FAST)))
    ck = os.path.join(out, "search.pt")
    cut = dataclasses.replace(FAST, checkpoint=ck, checkpoint_every=4, stop_after=6)
    try:
        fxadapt.transform(model, 0.5, (X1,), data=data, strategy="dna", config=TransformConfig(search=cut))
        res["interrupted"] = False
    except SearchInterrupted:
        res["interrupted"] = True
    resumed = TransformConfig(search=dataclasses.replace(cut, stop_after=None))
    res["resumed"] = _summary(fxadapt.transform(model, 0.5, (X1,), data=data, strategy="dna", config=resumed))
    fur = FurConfig(iterations=2, train_steps=3, batch_size=16, draws=2, val_samples=32, progress=False)
    res["fur"] = _summary(fxadapt.transform(model, 0.5, (X1,), data=data, strategy="fur",
                                            config=TransformConfig(fur=fur)))
    tuned = fxadapt.finetune(ResNetTiny(), data, epochs=1, cfg=fxadapt.FinetuneConfig(batch_size=16))
    res["finetune"] = {"state": tuned.state_dict()}
    res["world"] = torch.distributed.get_world_size()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("run", ["dna", "resumed", "fur", "finetune"])
def test_ranks_return_identical_models(ranks, run):
    r0, r1 = (r[run] for r in ranks)
    assert ranks[0]["world"] == ranks[1]["world"] == WORLD
    _same_state(r0["state"], r1["state"])                      # bit-identical weights and BN statistics
    if run != "finetune":
        assert r0["widths"] == r1["widths"] and r0["ratio"] == r1["ratio"]


@pytest.mark.parametrize("run", ["dna", "fur"])
def test_distributed_search_meets_budget(ranks, run):
    # never above the budget; the tiny model's coarse groups do not always reach the 1% window (the solver
    # then warns), so the lower bound is looser than the pipeline's default window
    assert 0.48 <= ranks[0][run]["ratio"] <= 0.5


def test_distributed_resume_equals_uninterrupted(ranks):
    for r in ranks:
        assert r["interrupted"]
        assert r["resumed"]["widths"] == r["dna"]["widths"]
        _same_state(r["resumed"]["state"], r["dna"]["state"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_search_on_cuda_with_bf16():
    data, model = _data(), ResNetTiny().eval()
    cfg = TransformConfig(search=dataclasses.replace(FAST, device="cuda", precision="bf16"))
    out = fxadapt.transform(model, 0.5, (X1,), data=data, strategy="dna", config=cfg)
    assert 0.495 <= fxadapt.report(out).macs_after / fxadapt.report(out).macs_before <= 0.5
