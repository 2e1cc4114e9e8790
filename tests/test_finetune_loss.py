"""``fxadapt.finetune(loss_fn=...)``: a regression loss instead of cross-entropy, and its distillation."""

import torch
from torch import nn
from torch.nn import functional as F

from fxadapt.train.finetune import FinetuneConfig, finetune

CFG = FinetuneConfig(lr=0.1, batch_size=32, seed=0)


def _regression(n: int = 256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    w = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 1.0, -1.0, 2.0]])
    return x, x @ w.T, w


def _linear(seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(4, 2)


def test_mse_loss_fits_a_linear_regression():
    x, y, w = _regression()
    before = float(F.mse_loss(_linear()(x), y).detach())
    m = finetune(_linear(), (x, y), epochs=30, cfg=CFG, loss_fn=F.mse_loss)
    after = float(F.mse_loss(m(x), y).detach())
    assert after < 1e-3 * before
    torch.testing.assert_close(m.weight.detach(), w, atol=2e-2, rtol=0)


def test_cross_entropy_as_loss_fn_is_the_default_bit_for_bit():
    x, y = torch.randn(128, 4), torch.randint(0, 2, (128,))
    a = finetune(_linear(), (x, y), epochs=2, cfg=CFG)
    b = finetune(_linear(), (x, y), epochs=2, cfg=CFG, loss_fn=F.cross_entropy)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_kd_one_learns_the_teacher_not_the_targets():
    x, y, w = _regression()
    teacher = nn.Linear(4, 2)
    with torch.no_grad():
        teacher.weight.copy_(-w)
        teacher.bias.zero_()
    cfg = FinetuneConfig(lr=0.1, batch_size=32, seed=0, kd=1.0)
    m = finetune(_linear(), (x, y), epochs=30, teacher=teacher, cfg=cfg, loss_fn=F.mse_loss)
    torch.testing.assert_close(m.weight.detach(), -w, atol=2e-2, rtol=0)   # the teacher's map, not y's


def test_kd_half_mixes_target_and_teacher():
    x, y, w = _regression()
    teacher = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        teacher.weight.zero_()
    cfg = FinetuneConfig(lr=0.1, batch_size=32, seed=0, kd=0.5)
    m = finetune(_linear(), (x, y), epochs=30, teacher=teacher, cfg=cfg, loss_fn=F.mse_loss)
    # the minimiser of 0.5 |f - y|^2 + 0.5 |f - 0|^2 is f = y / 2 (weight decay pulls it slightly lower)
    torch.testing.assert_close(m.weight.detach(), w / 2, atol=3e-2, rtol=0)
