"""Data-parallel search and fine-tuning under ``torchrun`` (torch.distributed), without a scheduler.

When the environment names a world (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` as ``torchrun`` sets them,
``WORLD_SIZE > 1``) and the caller has not initialised a process group, ``setup`` initialises one (NCCL
when the run uses CUDA, Gloo on CPU) and picks ``cuda:LOCAL_RANK`` for ``device="cuda"``.

The scheme, identical for DNA, FUR and ``fxadapt.finetune``:

- **global batch kept**: ``batch_size`` is the global batch. Every rank draws the same permutation (same
  seed) and takes its contiguous slice of each global batch (``fxadapt.train.data.Batches`` with
  ``rank``/``world``) — the deterministic equivalent of ``DistributedSampler``, so hyper-parameters mean
  the same at any world size; a run on N processes sees the data a 1-process run sees;
- after every backward, one ``all_reduce`` averages the gradients of the parameters being stepped
  (weights, or gate parameters in an architecture step) together with the BatchNorm running statistics
  (``sync_step``), each rank weighted by its shard size ``n_r``: ``g = sum_r n_r g_r / sum_r n_r``. With
  ``g_r`` the gradient of rank ``r``'s *mean* loss over its ``n_r`` samples this is exactly the gradient
  of the mean loss over the global batch, also when ``tensor_split`` gives unequal shards (a global batch
  of 15 on 2 ranks: 8 and 7; a plain average would over-weight the smaller shard). A term that does not
  depend on the samples (the budget penalty) has the same gradient on every rank and passes unchanged.
  For the same inputs to a BN, the same weights make its averaged ``running_mean`` equal the 1-process
  one (it is linear in the batch mean); ``running_var`` becomes the weighted mean of the per-rank
  variances (the spread between shards is missing). Every rank then applies the identical update to an
  identical state, so the supernet, its gates and its BN buffers stay **bit-identical** on all ranks at every
  step (the state is broadcast from rank 0 once at the start); architectures and returned weights are the same
  everywhere;
- **compared with one process** on the same global batch: without BatchNorm the loss of a sample does
  not depend on the other samples, so N ranks compute the 1-process step up to float reduction order
  (weights agree to ~1e-7). A training-mode BatchNorm normalises with the statistics of the *local* shard,
  not of the global batch (no SyncBatchNorm), so with BN the weights drift apart (0.1-0.2% after 10 steps
  on shards of 8 in ``tests/test_dist.py``, more for smaller shards) while the architecture found there
  is the same;
- only rank 0 writes checkpoints and shows progress bars (``is_main``); every rank reads the checkpoint
  to resume, so its path must be on a file system all ranks see.

The ``DistContext`` a run gets from ``setup(device, precision)`` is where its device and precision live:
``fxadapt.transform`` makes it from ``TransformConfig.device`` / ``.precision`` and hands it to the search
(``dna(..., ctx=)``, ``fur(..., ctx=)``); ``finetune`` from ``FinetuneConfig``.

Example (one process: nothing to do, every helper is a no-op):
    >>> ctx = setup("cpu")
    >>> ctx.world, ctx.rank, ctx.precision, is_main()
    (1, 0, 'auto', True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn

from fxadapt.errors import InputError
from fxadapt.options import Options

Precision = Literal["auto", "bf16", "fp32"]   # "bf16" autocast, "fp32"; "auto": bf16 on CUDA, fp32 on CPU


@dataclass(frozen=True)
class DistContext(Options):
    """This process's rank and world, the device it computes on and the autocast precision."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    precision: Precision = "auto"

    @property
    def active(self) -> bool:
        return self.world > 1


def env_world() -> int:
    """``WORLD_SIZE`` of a torchrun launch (1 outside one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str = "cpu", precision: Precision = "auto") -> DistContext:
    """The process group of this run (initialised here when torchrun launched us and nobody did yet), the
    device this rank computes on and the precision it computes in."""
    if not dist.is_available():
        return DistContext(0, 1, device, precision)
    if not dist.is_initialized() and env_world() > 1:
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return DistContext(0, 1, device, precision)
    if str(device) == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
    return DistContext(dist.get_rank(), dist.get_world_size(), device, precision)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and shows progress."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        dist.barrier()


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]


def _comm(t: torch.Tensor) -> torch.Tensor:
    """``t`` where the backend can reach it (NCCL only moves CUDA tensors)."""
    if t.device.type != "cuda" and dist.get_backend() == "nccl":
        return t.cuda()
    return t


def broadcast_state(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not ctx.active:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            buf = _comm(t.data)
            dist.broadcast(buf, 0)
            if buf is not t.data:
                t.data.copy_(buf)


def sync_step(params: Sequence[torch.Tensor], model: nn.Module, ctx: DistContext,
              weight: float | None = None) -> None:
    """Average (in one all_reduce) the gradients of ``params`` and the BN running statistics of ``model``
    over the ranks, each rank weighted by ``weight`` (its number of samples; equal weights when ``None``);
    call between ``backward()`` and ``optimizer.step()``."""
    if not ctx.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    bufs = _bn_buffers(model)
    tensors = grads + bufs
    if not tensors:
        return
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    w = 1.0 if weight is None else float(weight)
    parts = [t.detach().reshape(-1).to(dtype) * w for t in tensors]
    flat = _comm(torch.cat(parts + [torch.tensor([w], dtype=dtype, device=parts[0].device)]))
    dist.all_reduce(flat)
    flat = flat[:-1] / flat[-1]
    pos = 0
    with torch.no_grad():
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[pos:pos + n].view_as(g).to(g.device, g.dtype)
            pos += n
        for b in bufs:
            n = b.numel()
            b.copy_(flat[pos:pos + n].view_as(b))
            pos += n


def mean(value: float, weight: float, ctx: DistContext) -> float:
    """The weighted mean of ``value`` over the ranks (identical on every rank)."""
    if not ctx.active:
        return value
    t = _comm(torch.tensor([value * weight, weight], dtype=torch.float64))
    dist.all_reduce(t)
    return float(t[0] / t[1])


def autocast(device: str, precision: str):
    """bf16 autocast when ``precision`` is "bf16" (or "auto" on CUDA); a no-op context otherwise."""
    if precision not in get_args(Precision):
        raise InputError(f"precision must be one of 'auto', 'bf16', 'fp32'; got {precision!r}")
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    on = precision == "bf16" or (precision == "auto" and kind == "cuda")
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=on)
