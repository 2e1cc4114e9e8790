"""The users of ``passes.meta_run.MetaCache`` besides the shape check: the cross-check's replay
(``analysis.crosscheck.torch_macs``) and the write-back's meta run of the original
(``writeback.shapes_at.original_outputs``) give, cold and with the cache warm, what real runs give."""

import torch
from fxadapt.passes import meta_run
from fxadapt.passes.shape_check import shape_check
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxadapt import capture
from fxadapt.analysis.crosscheck import torch_macs
from fxadapt.analysis.propagate import propagate
from fxadapt.ir.inputs import as_inputs
from fxadapt.writeback.shapes_at import original_outputs


def _net() -> nn.Module:
    """Conv + BN + in-place clamp on repeated shapes (cache hits), a fixed pool (a size error elsewhere)."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(inplace=True))
              for _ in range(3)]
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *blocks, nn.AvgPool2d(8), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


def test_crosscheck_replay_counts_what_flop_counter_counts():
    net, x = _net(), torch.randn(1, 3, 8, 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    want = counter.get_total_flops() / 2   # the real model's run, counted by torch
    gm = capture(net, (x,), dynamic="static")
    shape_check(gm, (x,), fake=True)
    shapes = propagate(gm, "auto").shapes
    meta_run._ENTRIES.clear()
    cold = torch_macs(gm, shapes)
    warm = torch_macs(gm, shapes)   # every replay a cache hit now
    assert sum(cold.values()) == want and cold == warm


def test_original_outputs_meta_run_warm_cache():
    net = _net()
    meta_run._ENTRIES.clear()
    for _ in range(2):   # cold, then warm
        out, exact = original_outputs(net, as_inputs(torch.randn(2, 3, 8, 8)), exact=False)
        assert out.is_meta and not exact and tuple(out.shape) == tuple(net(torch.randn(2, 3, 8, 8)).shape)
        assert original_outputs(net, as_inputs(torch.randn(2, 3, 6, 6)), exact=False)[0] is None
