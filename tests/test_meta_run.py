"""``passes.meta_run``: the meta-device shape run (and its dispatch cache) records what real tensors give."""

import torch
from fxadapt.passes import meta_run
from fxadapt.passes.meta_run import MetaCache, run_on_meta
from fxadapt.passes.shape_check import flat_inputs
from torch import nn

from fxadapt import capture


class _Net(nn.Module):
    """Conv + BN + in-place clamp repeated on one shape (cache hits), a device move (aten.to.device)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(8))
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                  nn.Hardtanh(inplace=True)) for _ in range(3)])

    def forward(self, x):
        y = self.body(x)
        return y * self.scale.to(x.device, torch.float32).view(1, -1, 1, 1)


def _real_shapes(gm, x):
    shapes = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = (tuple(out.shape), out.dtype)
            return out

    with torch.no_grad():
        Rec(gm).run(x)
    return shapes


def test_meta_run_records_the_real_shapes_twice_and_caches():
    x = torch.randn(2, 8, 6, 6)
    gm = capture(_Net().eval(), (x,))
    real = _real_shapes(gm, x)
    meta_run._ENTRIES.clear()
    for _ in range(2):   # the second run is served by the cache
        assert run_on_meta(gm, flat_inputs(gm, (x,)))
        got = {n.name: (tuple(n.meta["val"].shape), n.meta["val"].dtype) for n in gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor)}
        assert got == real
    assert meta_run._ENTRIES   # something was cached


def test_cache_hit_equals_kernel_and_a_mismatch_still_raises():
    a = torch.empty(4, 3, 5, 5, device="meta")
    w = torch.empty(6, 3, 3, 3, device="meta")
    with MetaCache():
        first = torch.nn.functional.conv2d(a, w, stride=2)
        again = torch.nn.functional.conv2d(a, w, stride=2)
        assert (again.shape, again.stride(), again.dtype) == (first.shape, first.stride(), first.dtype)
        bad = torch.empty(6, 4, 3, 3, device="meta")   # 4 input channels where the input has 3
        try:
            torch.nn.functional.conv2d(a, bad)
        except RuntimeError:
            pass
        else:
            raise AssertionError("a channel mismatch must fail on meta tensors too")
        y = torch.empty(2, 3, device="meta")
        assert torch.nn.functional.hardtanh(y, inplace=True) is y   # in-place: its input comes back
        assert torch.nn.functional.hardtanh(y, inplace=True) is y
