"""Distributed search and fine-tuning: two Gloo processes on CPU, launched as torchrun would (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment; fxadapt initialises the process group itself),
compared with one process running the same calls on the same global batch.

- Every rank returns the same architecture with bit-identical weights (DNA, FUR, finetune), meets the
  budget, and a DNA run interrupted and resumed from its checkpoint equals the uninterrupted run.
- Each rank reads its own shard: a Dataset that notes every index it serves shows, step by step, that the
  ranks read disjoint indices whose concatenation is the global batch one process reads.
- Without BatchNorm a sample's loss depends on that sample alone, so 2 ranks must compute the 1-process
  weights up to float reduction order (``atol=1e-5, rtol=1e-4``), also for a global batch of 15 that
  splits into unequal shards (8 and 7: a plain average of the two shard gradients would be off by
  ``(g_0 - g_1) / 30``; ``sync_step`` weights each rank by its shard size).
- With BatchNorm the training-mode forward normalises with the local shard's statistics, so the weights
  differ from one process (0.1-0.2% here, bounded by 2%) while the architecture found is the same.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from models import PlainNet, ResNetTiny
from torch.utils.data import Dataset

import fxadapt
from fxadapt.errors import InputError
from fxadapt.pipeline.transform import SearchInterrupted, TransformConfig
from fxadapt.search.dna import SearchConfig
from fxadapt.search.fur import FurConfig
from fxadapt.train.data import Batches
from fxadapt.train.probe import PROBE

X1 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
WORLD = 2
ODD = 15    # a global batch tensor_split cuts into unequal shards on 2 ranks (8 and 7)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 5, (64,), generator=g)


FAST = SearchConfig(steps=10, warmup=3, batch_size=16, progress=False)
FUR = FurConfig(iterations=2, train_steps=3, batch_size=16, draws=2, val_samples=32, progress=False)


class Recorded(Dataset):
    """``(x[i], y[i])``, noting every index served: which samples this process trained on."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.read = x, y, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.read.append(int(i))
        return self.x[i], self.y[i]


def _model(cls):
    torch.manual_seed(0)                # the same initial weights in every process
    return cls().eval()


def _summary(model) -> dict:
    rep = fxadapt.report(model)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "widths": [c.after for c in rep.groups], "ratio": rep.macs_after / rep.macs_before}


def _dna(model, data, search: SearchConfig, val_data=None):
    return fxadapt.transform(model, 0.5, (X1,), data=data, val_data=val_data, strategy="dna",
                             config=TransformConfig(search=search))


def _compared() -> dict:
    """The runs compared with one process: the same calls in each spawned rank and in the test process."""
    data = _data()
    res = {"dna": _summary(_dna(_model(ResNetTiny), data, FAST)),
           "fur": _summary(fxadapt.transform(_model(ResNetTiny), 0.5, (X1,), data=data, strategy="fur",
                                             config=TransformConfig(fur=FUR))),
           "finetune": {"state": fxadapt.finetune(_model(ResNetTiny), data, epochs=1,
                                                  cfg=fxadapt.FinetuneConfig(batch_size=16)).state_dict()}}
    train = Recorded(*data)
    plain = _dna(_model(PlainNet), train, dataclasses.replace(FAST, batch_size=ODD), val_data=data)
    res["dna_plain"] = _summary(plain) | {"read": train.read[PROBE:]}   # after the data check's first samples
    train, model = Recorded(*data), _model(PlainNet)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = fxadapt.finetune(model, train, epochs=2, cfg=fxadapt.FinetuneConfig(batch_size=ODD))
    res["finetune_plain"] = {"state": tuned.state_dict(), "read": train.read, "init": init}
    return res


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    res = _compared()
    ck = os.path.join(out, "search.pt")
    cut = dataclasses.replace(FAST, checkpoint=ck, checkpoint_every=4, stop_after=6)
    try:
        _dna(_model(ResNetTiny), _data(), cut)
        res["interrupted"] = False
    except SearchInterrupted:
        res["interrupted"] = True
    res["resumed"] = _summary(_dna(_model(ResNetTiny), _data(), dataclasses.replace(cut, stop_after=None)))
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


@pytest.fixture(scope="module")
def single():
    """The reference: one process (no torchrun environment), the same calls on the same global batches."""
    assert int(os.environ.get("WORLD_SIZE", "1")) == 1
    return _compared()


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _relative_difference(a: dict, b: dict) -> float:
    """``||a - b|| / ||b||`` over all floating-point entries of two state dicts."""
    keys = [k for k in b if b[k].is_floating_point()]
    diff = torch.cat([(a[k] - b[k]).reshape(-1) for k in keys])
    return float(diff.norm() / torch.cat([b[k].reshape(-1) for k in keys]).norm())


@pytest.mark.parametrize("run", ["dna", "resumed", "fur", "finetune", "dna_plain", "finetune_plain"])
def test_ranks_return_identical_models(ranks, run):
    r0, r1 = (r[run] for r in ranks)
    assert ranks[0]["world"] == ranks[1]["world"] == WORLD
    _same_state(r0["state"], r1["state"])                      # bit-identical weights and BN statistics
    if "widths" in r0:
        assert r0["widths"] == r1["widths"] and r0["ratio"] == r1["ratio"]


@pytest.mark.parametrize("run", ["dna", "fur", "dna_plain"])
def test_distributed_search_meets_budget(ranks, run):
    # never above the budget; the tiny models' coarse groups do not always reach the 1% window (the solver
    # then warns), so the lower bound is looser than the pipeline's default window
    assert 0.48 <= ranks[0][run]["ratio"] <= 0.5


def test_distributed_resume_equals_uninterrupted(ranks):
    for r in ranks:
        assert r["interrupted"]
        assert r["resumed"]["widths"] == r["dna"]["widths"]
        _same_state(r["resumed"]["state"], r["dna"]["state"])


def test_batches_split_the_global_batch_into_disjoint_shards():
    data = (torch.arange(50.0),)
    for world in (2, 3):
        for step in (0, 3, 7):          # 7: the second epoch (a new permutation)
            whole = Batches(data, ODD, 0).indices(step)
            shards = [Batches(data, ODD, 0, rank=r, world=world).indices(step) for r in range(world)]
            assert torch.equal(torch.cat(shards), whole)
            assert len(set(torch.cat(shards).tolist())) == ODD
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(InputError, match="cannot give each of 2 ranks"):
        Batches(data, 1, 0, rank=1, world=2).indices(0)         # an empty shard has no mean loss


@pytest.mark.parametrize("run", ["dna_plain", "finetune_plain"])
def test_each_rank_reads_its_own_shard(ranks, single, run):
    ref, (r0, r1) = single[run]["read"], (r[run]["read"] for r in ranks)
    steps = len(ref) // ODD
    assert steps >= 4 and len(ref) == steps * ODD and len(r0) + len(r1) == len(ref)
    assert (len(r0) // steps, len(r1) // steps) == (8, 7)      # unequal shards: the weighting matters
    for k in range(steps):
        a, b, whole = r0[8 * k:8 * (k + 1)], r1[7 * k:7 * (k + 1)], ref[ODD * k:ODD * (k + 1)]
        assert not set(a) & set(b)
        assert a + b == whole                                   # rank 0 the first slice, rank 1 the rest


@pytest.mark.parametrize("run", ["dna_plain", "finetune_plain"])
def test_ranks_equal_one_process_without_bn(ranks, single, run):
    got, want = ranks[0][run], single[run]
    if "widths" in want:
        assert got["widths"] == want["widths"]
    assert got["state"].keys() == want["state"].keys()
    for k in want["state"]:
        torch.testing.assert_close(got["state"][k], want["state"][k], atol=1e-5, rtol=1e-4, msg=k)
    if "init" in want:                                          # the steps moved the weights far beyond atol
        assert _relative_difference(want["state"], want["init"]) > 0.01


@pytest.mark.parametrize("run", ["dna", "fur"])
def test_bn_model_finds_the_one_process_architecture(ranks, single, run):
    assert ranks[0][run]["widths"] == single[run]["widths"]


@pytest.mark.parametrize("run", ["dna", "fur", "finetune"])
def test_bn_weights_differ_by_shard_statistics_only(ranks, single, run):
    # the documented limit (README, distributed): per-rank batch statistics in the training-mode forward
    rel = _relative_difference(ranks[0][run]["state"], single[run]["state"])
    assert 0 < rel < 0.02, rel                                 # measured 0.001-0.002


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_search_on_cuda_with_bf16():
    data, model = _data(), ResNetTiny().eval()
    cfg = TransformConfig(search=FAST, device="cuda", precision="bf16")
    out = fxadapt.transform(model, 0.5, (X1,), data=data, strategy="dna", config=cfg)
    assert 0.495 <= fxadapt.report(out).macs_after / fxadapt.report(out).macs_before <= 0.5
