"""Tasks, base model and base training of the quality protocol (see bench/quality.py).

Two 10-class tasks, 3x16x16 inputs, standardised with the training split's mean and std:

- ``digits``: scikit-learn's bundled digits (1797 8x8 images), bilinearly upsampled to 16x16, repeated to
  3 channels, Gaussian noise sigma ``DIGITS_NOISE`` added once (fixed seed) so accuracies stay off 100%;
  a fixed permutation splits it 1000 train / 300 val / 497 test.
- ``shapes``: procedurally generated (nothing downloaded). Class = shape (disk, square, triangle, cross,
  ring) x fill (solid, striped). Each image draws a random centre, scale, rotation, foreground and
  background colour, stripe phase/orientation, a low-contrast background grating (clutter) and pixel
  noise; shapes are rasterised at 32x32 and average-pooled to 16x16 (anti-aliasing). Split sizes are
  ``SHAPES_SPLIT`` (10000 / 1000 / 2000); a task's data depends only on its generator seed, never on the
  protocol seed.

Base model: the bundled ``ExampleResNet`` (``fxadapt.examples``: stem, 2+2 basic blocks, SE gate, 16/32
channels; 4.6M MACs at 16x16). A base is trained per protocol seed with ``fxadapt.finetune`` (the shared
recipe, no teacher, lr 0.05) for ``base_epochs``; ``converged_epochs`` chooses that number once per task:
train for E epochs, then 2E, ... (each from scratch, cosine over the whole run) until doubling improves
validation accuracy by less than ``PLATEAU`` (the protocol's noise floor); the whole ladder is cached.
Cached bases and ladders carry ``recipe_hash(task)`` in their file names (a changed recipe default trains new
ones).

A task declares what it is measured by in ``KINDS`` (a ``Kind``): its base model, its metric (higher is
better; accuracy, stored as a fraction and printed in %, or PSNR, stored and printed in dB), its loss
(``None``: cross-entropy, the default of ``fxadapt.finetune`` and of the searches) and the learning rate of
every weight step (``None``: the protocol's defaults). ``sr`` is the regression task of bench/quality_sr.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from quality_sr import CONSTANTS as SR_CONSTANTS
from quality_sr import SR_LR, SR_PLATEAU, l1, psnr, psnr_bicubic, sr_model, sr_task
from torch.nn import functional as F

from fxadapt.examples import ExampleResNet
from fxadapt.train.finetune import FinetuneConfig, accuracy, finetune

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
DIGITS_NOISE = 0.6
DIGITS_SPLIT = (1000, 300)
SHAPES_SPLIT = (10000, 1000, 2000)
SHAPES_NOISE = 0.2
PLATEAU = 0.005
BASE_LR = 0.05
INPUT = (1, 3, 16, 16)
WIDTH = 8


def _standardise(parts: dict) -> dict:
    x = parts["train"][0]
    mean, std = x.mean(), x.std()
    return {k: ((v[0] - mean) / std, v[1]) for k, v in parts.items()}


def digits_task() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    x = (x - x.mean()) / x.std() + DIGITS_NOISE * torch.randn(x.shape, generator=g)
    perm = torch.randperm(len(x), generator=g)
    a, b = DIGITS_SPLIT
    idx = {"train": perm[:a], "val": perm[a:a + b], "test": perm[a + b:]}
    return _standardise({k: (x[i], y[i]) for k, i in idx.items()})


def _shape_masks(p: torch.Tensor) -> torch.Tensor:
    """Masks (5, N, H, W) of disk, square, triangle, cross and ring in shape coordinates ``p`` (N, H, W,
    2)."""
    px, py = p[..., 0], p[..., 1]
    r = p.norm(dim=-1)
    normals = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    tri = torch.stack([px * nx + py * ny < 0.55 for nx, ny in normals]).all(0)
    cross = ((px.abs() < 0.3) & (py.abs() < 0.95)) | ((py.abs() < 0.3) & (px.abs() < 0.95))
    return torch.stack([r < 0.9, torch.maximum(px.abs(), py.abs()) < 0.8, tri, cross,
                        (r > 0.5) & (r < 0.95)]).float()


def _shapes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    y = torch.randint(0, 10, (n,), generator=g)
    shape, striped = y % 5, y // 5
    lin = torch.linspace(-1, 1, 32)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1)             # (32, 32, 2)
    centre, scale, theta = (u(n, 2) - 0.5) * 0.7, 0.4 + 0.3 * u(n), 2 * math.pi * u(n)
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1),
                       torch.stack([theta.sin(), theta.cos()], -1)], -2)
    p = torch.einsum("nij,nhwj->nhwi", rot, (grid - centre[:, None, None]) / scale[:, None, None, None])
    mask = _shape_masks(p)[shape, torch.arange(n)]                                # (n, 32, 32)
    phase, angle = 2 * math.pi * u(n), math.pi * u(n)
    along = grid[..., 0] * angle.cos()[:, None, None] + grid[..., 1] * angle.sin()[:, None, None]
    stripes = (torch.sin(along * 2 * math.pi / 0.38 + phase[:, None, None]) > 0).float()
    fill = torch.where(striped[:, None, None].bool(), stripes, torch.ones_like(stripes)) * mask
    b_angle, b_phase = math.pi * u(n), 2 * math.pi * u(n)
    b_along = grid[..., 0] * b_angle.cos()[:, None, None] + grid[..., 1] * b_angle.sin()[:, None, None]
    clutter = 0.15 * torch.sin(b_along * 2 * math.pi / (0.3 + 0.5 * u(n, 1, 1)) + b_phase[:, None, None])
    # dark shape on light or v.v.
    dark = (u(n, 1, 1, 1) < 0.5).float()
    fg, bg = dark * 0.1 + (1 - dark) * 0.6 + 0.3 * u(n, 3, 1, 1), \
            dark * 0.6 + (1 - dark) * 0.1 + 0.3 * u(n, 3, 1, 1)
    img = bg + (fg - bg) * fill[:, None] + clutter[:, None]
    img = F.avg_pool2d(img, 2) + SHAPES_NOISE * torch.randn(n, 3, 16, 16, generator=g)
    return img, y


def shapes_task() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    parts = {k: _shapes(n, g) for k, n in zip(("train", "val", "test"), SHAPES_SPLIT)}
    return _standardise(parts)


TASKS = {"digits": digits_task, "shapes": shapes_task, "sr": sr_task}


def base_model(seed: int) -> ExampleResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ExampleResNet(num_classes=10, width=WIDTH)


@dataclass(frozen=True)
class Kind:
    """What a task is measured by and trained with (see module docstring)."""

    model: Callable[[int], torch.nn.Module] = base_model   # seed -> the untrained base
    metric: Callable = accuracy            # (model, (inputs, targets)) -> float, higher is better
    name: str = "accuracy"
    key: str = "acc"                       # the rows' field: "acc", "val_acc", "acc_before_ft"
    unit: str = "%"
    scale: float = 100.0                   # printed = scale * stored
    loss_fn: Callable | None = None        # None: cross-entropy
    lr: float | None = None                # every weight step's SGD lr (None: the protocol's defaults)
    plateau: float = PLATEAU               # the base ladder's noise floor, in stored units
    reference: Callable | None = None      # split -> a method-free reference score (bicubic for sr)
    constants: dict | None = None          # hashed into the task's rows and bases (None: the classic tasks')

    def finetune_config(self, **kw) -> FinetuneConfig:
        return FinetuneConfig(**({"lr": self.lr} if self.lr is not None else {}), **kw)


CLASSIFY = Kind()
KINDS = {"digits": CLASSIFY, "shapes": CLASSIFY,
         "sr": Kind(model=sr_model, metric=psnr, name="PSNR", key="psnr", unit="dB", scale=1.0, loss_fn=l1,
                    lr=SR_LR, plateau=SR_PLATEAU, reference=psnr_bicubic, constants=SR_CONSTANTS)}


def recipe_hash(task: str = "digits") -> str:
    """Hash of what a cached base depends on besides task, epochs and seed: the base recipe (every
    ``FinetuneConfig`` option, defaults included), the model width and the tasks' constants (a regression
    task: also its loss and constants); part of every cached base's and ladder's file name, so a changed
    default trains new ones."""
    kind = KINDS[task]
    cfg = FinetuneConfig(lr=kind.lr if kind.lr is not None else BASE_LR, kd=0.0, seed=0)
    fields = {f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    consts = (DIGITS_NOISE, DIGITS_SPLIT, SHAPES_SPLIT, SHAPES_NOISE, PLATEAU, WIDTH, INPUT)
    payload = [fields, repr(consts)]
    if kind.constants is not None:
        payload += [repr(sorted(kind.constants.items())), getattr(kind.loss_fn, "__qualname__", "")]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def ladder_path(task: str, start: int, cap: int) -> str:
    return os.path.join(CACHE, f"ladder_{task}_{start}_{cap}_{recipe_hash(task)}.json")


def _cached_train(task: str, data: dict, epochs: int, seed: int) -> torch.nn.Module:
    kind = KINDS[task]
    path = os.path.join(CACHE, f"base_{task}_e{epochs}_s{seed}_{recipe_hash(task)}.pt")
    model = kind.model(seed)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path))
        return model.eval()
    cfg = FinetuneConfig(lr=kind.lr if kind.lr is not None else BASE_LR, kd=0.0, seed=seed)
    finetune(model, data["train"], epochs, cfg=cfg, loss_fn=kind.loss_fn)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def converged_epochs(task: str, data: dict, start: int, cap: int) -> tuple[int, list]:
    """Smallest E in start, 2*start, ... (<= cap) whose doubling gains < the plateau in val metric (seed
    0)."""
    path = ladder_path(task, start, cap)
    if os.path.exists(path):
        with open(path) as f:
            d = json.load(f)
        return d["epochs"], d["ladder"]
    ladder, e, kind = [], start, KINDS[task]
    while True:
        ladder.append((e, kind.metric(_cached_train(task, data, e, 0), data["val"])))
        print(f"[base] {task}: {e} epochs -> val {ladder[-1][1]:.4f}", flush=True)
        if len(ladder) >= 2 and ladder[-1][1] - ladder[-2][1] < kind.plateau:
            chosen = ladder[-1][0]
            break
        if 2 * e > cap:
            chosen = e
            break
        e *= 2
    with open(path, "w") as f:
        json.dump({"epochs": chosen, "ladder": ladder}, f)
    return chosen, ladder


def trained_base(task: str, data: dict, epochs: int, seed: int) -> torch.nn.Module:
    return _cached_train(task, data, epochs, seed)
