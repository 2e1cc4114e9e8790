"""Write-back of transformers vision families whose code reads sizes from the config's per-stage lists
(PVTv2's ``hidden_sizes``), from split sizes computed from the input (FocalNet's modulation) or from
``*_size_*`` attributes (Hiera's ``hidden_size_output``); tiny configs."""

import warnings

import pytest
import torch

import fxadapt
from fxadapt.analysis.count import count_macs

T = pytest.importorskip("transformers")

X = torch.randn(1, 3, 64, 64)


def _pvt():
    return T.PvtV2ForImageClassification(T.PvtV2Config(
        image_size=64, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 3, 4],
        num_labels=10))


def _focalnet():
    return T.FocalNetForImageClassification(T.FocalNetConfig(image_size=64, embed_dim=16, depths=[1, 1],
                                                              num_labels=10))


def _hiera():
    return T.HieraForImageClassification(T.HieraConfig(image_size=[64, 64], embed_dim=16, depths=[1, 1, 1, 1],
                                                       num_heads=[1, 2, 4, 8], num_labels=10))


def _transform(make, budget):
    torch.manual_seed(0)
    m = make().eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fxadapt.transform(m, budget, (X,))
    return m, out, [x for x in w if type(x.message).__name__ == "WriteBackWarning"]


@pytest.mark.parametrize("make,budget", [(_pvt, 0.5), (_focalnet, 0.5), (_focalnet, 1.5), (_hiera, 1.5)],
                         ids=["pvt_v2-0.5", "focalnet-0.5", "focalnet-1.5", "hiera-1.5"])
def test_vision_writes_back(make, budget):
    m, out, warned = _transform(make, budget)
    assert not warned, [str(x.message) for x in warned]
    assert type(out) is type(m)
    with torch.no_grad():
        got, ref = out(X).logits, m(X).logits
    assert got.shape == (1, 10)
    base = count_macs(m, (X,))
    assert abs(count_macs(out, (X,)) - budget * base) <= 0.01 * budget * base
    if budget > 1:
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_inexpressible_size_is_named():
    """Hiera at 0.5: the plan makes a stage's input and output widths equal, and its code skips the
    projection when ``hidden_size == hidden_size_output``: the warning names the module and the sizes."""
    _, out, warned = _transform(_hiera, 0.5)
    if not warned:
        pytest.skip("written back")
    text = str(warned[0].message)
    assert "hiera.encoder.stages.1.layers.0 (HieraLayer)" in text and "hidden_size_output" in text
