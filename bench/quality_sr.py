"""The quality protocol's regression task ``sr``: 2x single-image super-resolution (see bench/quality.py).

Images (procedural, nothing downloaded): 1-channel 32x32 HR patches, each the sum of a random linear
gradient, 2-4 random shapes (disks, rectangles, triangles; each filled flat or with a grating) and one
global grating or checkerboard texture, with spatial frequencies drawn log-uniformly from 1 to 12 cycles
per patch (the LR Nyquist limit is 8), rendered at 64x64 and area-averaged to 32x32 (anti-aliasing), then
clipped to [0, 1]. LR = the HR patch area-downsampled 2x (16x16). Train / val / test are generated from the
generator seeds ``SR_SEEDS`` (``SR_SPLIT`` images each), so no split shares a draw with another. Inputs and
targets are standardised by the fixed affine map ``(v - SR_MEAN) / SR_STD`` (no statistic of any split).

Model (ESPCN, Shi et al. 2016, with ReLU and a global residual): conv 5x5 (1 -> 32) -> conv 3x3 (32 -> 32)
-> conv 3x3 (32 -> r^2) -> ``pixel_shuffle(r)``, plus the bilinearly upsampled input; r = 2, 2.9M MACs at
16x16 input. Loss: L1 on the standardised HR pixels (``l1``, as EDSR; ``fxadapt.finetune(loss_fn=l1)``,
``SearchConfig(loss_fn=l1)``, ``FurConfig(loss_fn=l1)``). Every weight update of the task uses SGD at
``SR_LR`` (the base, the fine-tunes, DNA's and FUR's weight steps): chosen on val for the base recipe
(40 epochs: lr 0.2 / 0.5 / 1.0 -> 29.86 / 30.25 / 29.19 dB; MSE at 0.5, 80 epochs: 29.99; without the
residual: 27.20; the classification tasks' SGD at 0.05 stalls near bicubic). SGD, not Adam: the
protocol's one optimiser (``fxadapt.finetune``); Adam at 2e-3 reaches 30.75 dB in 600 steps.

Metric: PSNR in dB, ``10 log10(1 / MSE)`` per test image after un-standardising and clipping the output
to [0, 1], averaged over the images (higher is better, as for accuracy). The bicubic-upsampling PSNR is
reported beside the bases.

Example:
    >>> d = sr_task(small=True)
    >>> tuple(d["train"][0].shape[1:]), tuple(d["train"][1].shape[1:])
    ((1, 16, 16), (1, 32, 32))
    >>> round(psnr(Espcn(), d["val"]) - psnr_bicubic(d["val"]), 1) < 0     # untrained: below bicubic
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

SR_SPLIT = (2000, 300, 500)
SR_SEEDS = (2101, 2102, 2103)
SR_HR, SR_SCALE, SR_WIDTHS = 32, 2, (32, 32)
SR_FREQ = (1.0, 12.0)        # cycles per patch, log-uniform
SR_PLATEAU = 0.1             # dB: the base ladder stops when doubling the epochs gains less
SR_LR = 0.5
SR_MEAN, SR_STD = 0.5, 0.25  # pixels in [0, 1] -> about [-2, 2]


class Espcn(nn.Module):
    """Sub-pixel convolution super-resolution network (ESPCN) with ReLU and a bilinear global residual."""

    def __init__(self, widths: tuple[int, int] = SR_WIDTHS, scale: int = SR_SCALE):
        super().__init__()
        a, b = widths
        self.conv1 = nn.Conv2d(1, a, 5, padding=2)
        self.conv2 = nn.Conv2d(a, b, 3, padding=1)
        self.conv3 = nn.Conv2d(b, scale * scale, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        up = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return F.pixel_shuffle(self.conv3(h), self.scale) + up


def l1(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The regression loss of the task (mean absolute error on standardised pixels)."""
    return F.l1_loss(prediction, target)


def _grating(p: torch.Tensor, freq: torch.Tensor, angle: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """``sin(2 pi f <p, (cos a, sin a)> / 2 + phase)`` on coordinates ``p`` (N, H, W, 2) in [-1, 1]."""
    along = p[..., 0] * angle.cos()[:, None, None] + p[..., 1] * angle.sin()[:, None, None]
    return torch.sin(math.pi * freq[:, None, None] * along + phase[:, None, None])


def _shape(grid: torch.Tensor, n: int, u) -> torch.Tensor:
    """A random disk, rectangle or triangle per image: its mask (N, H, W), soft-edged by the 2x render."""
    kind, centre = torch.floor(3 * u(n)).long(), (u(n, 2) - 0.5) * 1.4
    size, theta = 0.15 + 0.5 * u(n), 2 * math.pi * u(n)
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1),
                       torch.stack([theta.sin(), theta.cos()], -1)], -2)
    p = torch.einsum("nij,nhwj->nhwi", rot, (grid - centre[:, None, None]) / size[:, None, None, None])
    aspect = 0.4 + 0.6 * u(n)[:, None, None]
    disk = p.norm(dim=-1) < 1
    rect = (p[..., 0].abs() < 1) & (p[..., 1].abs() < aspect)
    normals = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    tri = torch.stack([p[..., 0] * nx + p[..., 1] * ny < 0.5 for nx, ny in normals]).all(0)
    return torch.stack([disk, rect, tri]).float()[kind, torch.arange(n)]


def sr_images(n: int, seed: int) -> torch.Tensor:
    """``n`` HR patches (n, 1, SR_HR, SR_HR) in [0, 1], a pure function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    freq = lambda: SR_FREQ[0] * (SR_FREQ[1] / SR_FREQ[0]) ** u(n)  # noqa: E731
    lin = torch.linspace(-1, 1, 2 * SR_HR)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).expand(n, -1, -1, -1)
    slope = (u(n, 2) - 0.5) * 0.6
    img = 0.5 + (u(n, 1, 1) - 0.5) * 0.4 + slope[:, 0, None, None] * grid[..., 0] + slope[:, 1, None,
                                                                                          None] * grid[..., 1]
    texture = _grating(grid, freq(), math.pi * u(n), 2 * math.pi * u(n))
    checker = texture * _grating(grid, freq(), math.pi * u(n), 2 * math.pi * u(n))
    img = img + 0.15 * u(n, 1, 1) * torch.where(u(n, 1, 1) < 0.5, texture, checker)
    for _ in range(4):
        present = (u(n, 1, 1) < 0.75).float()
        mask = _shape(grid, n, u) * present
        fill = (u(n, 1, 1) - 0.5) * 1.2 + 0.4 * _grating(grid, freq(), math.pi * u(n), 2 * math.pi * u(n)) \
            * (u(n, 1, 1) < 0.5).float()
        img = img * (1 - mask) + (0.5 + fill * 0.6) * mask
    return F.avg_pool2d(img[:, None].clamp(0, 1), 2)


def downsample(hr: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(hr, SR_SCALE)


def sr_task(small: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{split: (LR inputs, HR targets)}, standardised (``small``: 64 images a split)."""
    hr = {k: sr_images(64 if small else n, s)
          for k, n, s in zip(("train", "val", "test"), SR_SPLIT, SR_SEEDS)}
    return {k: ((downsample(v) - SR_MEAN) / SR_STD, (v - SR_MEAN) / SR_STD) for k, v in hr.items()}


def _psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    m, s = SR_MEAN, SR_STD
    err = ((pred * s + m).clamp(0, 1) - (target * s + m)).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / err.clamp_min(1e-10))).mean())


@torch.no_grad()
def psnr(model: nn.Module, data, batch_size: int = 256) -> float:
    """Mean per-image PSNR (dB) of ``model`` (eval mode) on ``(LR, HR)`` standardised tensors."""
    x, y = data[:2]
    model.eval()
    pred = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return _psnr(pred, y)


def psnr_bicubic(data) -> float:
    """PSNR of bicubic upsampling (the reference every SR network should beat)."""
    x, y = data[:2]
    return _psnr(F.interpolate(x, scale_factor=SR_SCALE, mode="bicubic", align_corners=False), y)


def sr_model(seed: int) -> Espcn:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Espcn()


CONSTANTS = {"SR_SPLIT": SR_SPLIT, "SR_SEEDS": SR_SEEDS, "SR_HR": SR_HR, "SR_SCALE": SR_SCALE,
             "SR_WIDTHS": SR_WIDTHS, "SR_FREQ": SR_FREQ, "SR_PLATEAU": SR_PLATEAU, "SR_LR": SR_LR,
             "SR_MEAN": SR_MEAN, "SR_STD": SR_STD}
