"""``fxadapt.finetune``: the one fine-tuning recipe every candidate gets (benchmarks compare like with like).

SGD with momentum 0.9 and weight decay 5e-4, cosine learning-rate decay over all steps, cross-entropy;
with a ``teacher`` (e.g. the original model) the loss is ``(1 - kd) * CE + kd * T^2 * KL(p_T(teacher) ||
p_T(student))`` at temperature ``T`` (Hinton distillation). ``loss_fn`` replaces cross-entropy (a
regression loss such as ``F.mse_loss``): the loss is then ``loss_fn(out, y)``, and with a teacher
``(1 - kd) * loss_fn(out, y) + kd * loss_fn(out, teacher(x))`` (distillation of a regression: the
teacher's output is a second target; ``temperature`` is not used). Batches come from
``fxadapt.train.data.Batches`` (deterministic per seed); lists of Hugging Face batches, dicts of tensors and
DataLoaders are read as the model takes them (``fxadapt.train.probe.checked_batches``: per-token labels scored
as the model's own loss does); data without labels trains on the teacher's term alone. The model is trained in
place and returned in eval mode.

``train_for`` is the same loop for a given number of steps on a ``Schedule``: a run that continues a cosine
another loop began (``offset`` steps of it taken, e.g. by a search: ``lr_s = lr * 0.5 (1 + cos(pi (offset +
s) / (offset + steps)))``) with SGD or AdamW (``fxadapt.transform(..., recovery=N)``). A model that
``fxadapt.transform`` returned, fine-tuned without a teacher, trains on its labels alone: a warning says so
(the original is not kept alive by the result; pass ``teacher=`` the original, or ``transform(...,
recovery=N)``, which distils from it).

Under ``torchrun`` (``fxadapt.dist``): ``batch_size`` is the global batch, each rank trains on its slice,
gradients and BN statistics are averaged after every backward (one all_reduce), and the model is
broadcast from rank 0 first, so every rank ends with bit-identical weights. ``device="cuda"`` uses
``cuda:LOCAL_RANK``; ``precision="auto"`` autocasts to bf16 on CUDA only.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    >>> _ = finetune(m, (x, y), epochs=2, cfg=FinetuneConfig(batch_size=16))
    >>> m.training
    False
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from fxadapt import dist
from fxadapt.dist import Precision
from fxadapt.errors import InputError, warn
from fxadapt.options import Options, check_device
from fxadapt.train.data import Batch, Batches, prediction, task_loss
from fxadapt.train.probe import checked_batches


@dataclass(frozen=True)
class FinetuneConfig(Options):
    """The fine-tuning recipe's options (``finetune`` is not run by ``transform``: it has its own device and
    precision); checked at construction."""

    hints = {"precision": "'auto': bf16 autocast on CUDA, fp32 on CPU"}

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    kd: float = 0.5
    temperature: float = 4.0
    seed: int = 0
    device: str = "cpu"         # "cuda" uses cuda:LOCAL_RANK under torchrun
    precision: Precision = "auto"

    def __post_init__(self):
        super().__post_init__()
        check_device(type(self).__name__, self.device)
        self.check(self.lr > 0.0, "lr", "above 0")
        self.check(self.batch_size >= 1, "batch_size", "at least 1")
        self.check(0.0 <= self.kd <= 1.0, "kd", "in [0, 1] (the distillation loss's weight)")
        self.check(self.temperature > 0.0, "temperature", "above 0")


@dataclass(frozen=True)
class Schedule:
    """How many steps ``train_for`` takes, on which cosine (``offset``: its steps already taken by another
    loop) and with which optimizer (SGD with ``momentum``, or AdamW; both with ``weight_decay``)."""

    steps: int
    offset: int = 0
    optimizer: Literal["sgd", "adamw"] = "sgd"

    def factor(self, s: int) -> float:
        """The learning rate of step ``s`` of this run over the peak."""
        return 0.5 * (1 + math.cos(math.pi * (self.offset + s) / (self.offset + self.steps)))


def finetune(model: nn.Module, data: Any, epochs: int, teacher: nn.Module | None = None,
             cfg: FinetuneConfig = FinetuneConfig(), loss_fn: Callable | None = None) -> nn.Module:
    """Train ``model`` for ``epochs`` passes over ``data`` (see module docstring; ``loss_fn(out, y)``: a loss
    other than cross-entropy, e.g. ``torch.nn.functional.mse_loss``).

    >>> m, x = nn.Linear(4, 1), torch.randn(64, 4)
    >>> y = x.sum(1, keepdim=True)
    >>> _ = finetune(m, (x, y), epochs=40, cfg=FinetuneConfig(lr=0.1, batch_size=16), loss_fn=F.mse_loss)
    >>> bool(F.mse_loss(m(x), y) < 0.01)
    True
    """
    if teacher is None and getattr(model, "fxadapt_report", None) is not None:
        warn("finetune: this model came from fxadapt.transform and no teacher was given, so it trains on its "
             "labels alone (no distillation from the original): pass teacher=<the original model>, or use "
             "fxadapt.transform(..., data=..., recovery=N), which distils from it")
    data = checked_batches(model, data, loss_fn or F.cross_entropy)   # (a second check passes it through)
    n = len(Batches(data, cfg.batch_size))
    steps = max(1, epochs * max(1, n // min(cfg.batch_size, n)))
    return train_for(model, data, Schedule(steps), teacher, cfg, loss_fn)


def train_for(model: nn.Module, data: Any, schedule: Schedule, teacher: nn.Module | None = None,
              cfg: FinetuneConfig = FinetuneConfig(), loss_fn: Callable | None = None) -> nn.Module:
    """Train ``model`` for ``schedule.steps`` steps on ``data`` (module docstring), the learning rate
    ``cfg.lr * schedule.factor(s)``; in place, returned in eval mode.

    >>> m, x = nn.Linear(4, 3), torch.randn(64, 4)
    >>> _ = train_for(m, (x, torch.randint(0, 3, (64,))), Schedule(5, offset=5), cfg=FinetuneConfig(lr=0.1))
    >>> round(Schedule(5, offset=5).factor(0), 3)     # the second half of a 10-step cosine
    0.5
    """
    ctx = dist.setup(cfg.device, cfg.precision)
    batches = Batches(checked_batches(model, data, loss_fn or F.cross_entropy), cfg.batch_size, cfg.seed,
                      ctx.rank, ctx.world)
    model.to(ctx.device).train()
    dist.broadcast_state(model, ctx)
    if teacher is not None:
        teacher.to(ctx.device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay) if schedule.optimizer == "adamw"
        else torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.factor)
    torch.manual_seed(cfg.seed)
    for step in range(schedule.steps):
        batch = batches.get(step, ctx.device)
        distil = teacher is not None and (cfg.kd > 0 or batch.targets is None)
        with dist.autocast(ctx.device, ctx.precision):
            logits = prediction(batch.call(model)).float()
            with torch.no_grad():
                t_logits = prediction(batch.call(teacher)).float() if distil else None
        loss = kd_loss(logits, batch, t_logits, cfg.kd, cfg.temperature, loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.sync_step(params, model, ctx, batch.size)
        opt.step()
        sched.step()
    return model.eval()


def kd_loss(out: torch.Tensor, batch: Batch, t_out: torch.Tensor | None, kd: float, temperature: float,
            loss_fn: Callable | None = None) -> torch.Tensor:
    """``(1 - kd) CE(out, y) + kd T^2 KL(p_T(t_out) || p_T(out))`` (Hinton distillation at temperature ``T``),
    or with ``loss_fn`` ``(1 - kd) loss_fn(out, y) + kd loss_fn(out, t_out)``; without a teacher output the
    task loss alone, without labels the teacher's term alone.

    >>> from fxadapt.ir.inputs import Inputs
    >>> b = Batch(Inputs((torch.zeros(2, 1),), {}), None)
    >>> float(kd_loss(torch.zeros(2, 3), b, torch.zeros(2, 3), 0.5, 4.0))    # the teacher itself: no distance
    0.0
    """
    if batch.targets is None and t_out is None:
        raise InputError("finetune: data without labels needs a teacher (teacher=the original model)")
    loss = task_loss(out, batch, loss_fn or F.cross_entropy) if batch.targets is not None else None
    if t_out is None:
        return loss
    if loss_fn is not None:
        kd_term = loss_fn(out, t_out)
    else:
        t = temperature
        rows = out.reshape(-1, out.shape[-1]) / t
        kd_term = t * t * F.kl_div(F.log_softmax(rows, -1), F.log_softmax(t_out.reshape(rows.shape) / t, -1),
                                   log_target=True, reduction="batchmean")
    return kd_term if loss is None else (1 - kd) * loss + kd * kd_term


@torch.no_grad()
def accuracy(model: nn.Module, data: Any, batch_size: int = 256, device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``(inputs, targets)``."""
    x, y = Batches(data, batch_size).all()[:2]
    model.to(device).eval()
    correct = sum(int((model(x[i:i + batch_size].to(device)).argmax(-1)
                       == y[i:i + batch_size].to(device)).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)
