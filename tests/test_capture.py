"""``fxadapt.capture``: the lifted graph module is the model (numerics, training behaviour, names, pytrees,
batch size, copies), the caller's model is never touched, and failures are reported as the right error."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.nn import functional as F

import fxadapt
from fxadapt import CaptureError, InputError


class Net(nn.Module):
    """conv-bn-relu, a residual conv, dropout and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.3), nn.ReLU())
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn(self.body(x)))
        return self.head(self.drop(x.mean((2, 3))))


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    for bn in (net.stem[1], net.bn):
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


X1 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
X4 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def test_captured_equals_original_in_eval_at_another_batch_size():
    net = _net()
    gm = fxadapt.capture(net, (X1,))
    assert isinstance(gm, GraphModule)
    assert not gm.training
    with torch.no_grad():
        torch.testing.assert_close(gm(X1), net(X1), rtol=0, atol=1e-6)
        torch.testing.assert_close(gm(X4), net(X4), rtol=0, atol=1e-6)  # example batch 1, run with 4
        assert gm(X4[:3]).shape == (3, 4)


def test_parametric_calls_are_lifted_to_modules_with_original_fqns():
    net = _net()
    gm = fxadapt.capture(net, (X1,))
    assert dict(gm.named_parameters()).keys() == dict(net.named_parameters()).keys()
    assert dict(gm.named_buffers()).keys() == dict(net.named_buffers()).keys()
    for name, p in net.state_dict().items():
        assert torch.equal(gm.state_dict()[name], p), name
    kinds = {n.target: type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert kinds == {"stem.0": nn.Conv2d, "stem.1": nn.BatchNorm2d, "body": nn.Conv2d, "bn": nn.BatchNorm2d,
                     "drop": nn.Dropout, "head": nn.Linear}
    assert gm.get_submodule("stem.1").momentum == 0.3  # hyper-parameters export cannot see survive
    assert gm.get_submodule("drop").p == 0.5
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]


class OddNames(nn.Module):
    """Parameters a module lift would rename: a top-level weight, a conv kernel not called ``weight``, and an
    embedding table reused as the output projection (tied)."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 3, 1, 1))
        self.proj = nn.Parameter(torch.randn(6, 4))
        self.emb = nn.Embedding(7, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x, ids):
        h = F.linear(F.conv2d(x, self.kernel).mean((2, 3)), self.proj)
        return F.linear(self.bn(h + self.emb(ids).mean(1)), self.emb.weight)


def test_odd_and_tied_parameter_names_survive_capture():
    torch.manual_seed(0)
    net = OddNames().eval()
    ids = torch.tensor([[1, 2, 3]])
    gm = fxadapt.capture(net, (X1, ids))
    assert set(gm.state_dict()) == set(net.state_dict())
    assert set(dict(gm.named_parameters())) == {"kernel", "proj", "emb.weight", "bn.weight", "bn.bias"}
    x4, ids4 = X4, torch.tensor([[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 2, 2]])
    with torch.no_grad():
        torch.testing.assert_close(gm(x4, ids4), net(x4, ids4), rtol=0, atol=1e-6)
    gm.train()
    gm(x4, ids4).sum().backward()
    assert gm.get_parameter("emb.weight").grad is not None  # one tied tensor, trained through both uses
    assert int(gm.get_submodule("bn").num_batches_tracked) == 1
    gm2 = copy.deepcopy(gm)
    gm2.load_state_dict(net.state_dict())  # state dicts interchange with the original


class Shared(nn.Module):
    """One conv module reused in two places (registered under two names)."""

    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(3, 4, 1)
        self.first = nn.Sequential(shared, nn.ReLU())
        self.second = nn.Sequential(shared)

    def forward(self, x):
        return self.second(self.first(self.stem(x)))


def test_shared_module_keeps_one_tensor_under_its_first_name():
    torch.manual_seed(0)
    net = Shared().eval()
    gm = fxadapt.capture(net, (X1,))
    assert set(dict(gm.named_parameters())) == set(dict(net.named_parameters()))  # first.0.*, not second.0.*
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert reads <= {"first.0.weight", "first.0.bias"}
    with torch.no_grad():
        torch.testing.assert_close(gm(X4), net(X4), rtol=0, atol=1e-6)
        gm.get_parameter("first.0.weight").mul_(2)  # both uses read the one tensor
        net.first[0].weight.mul_(2)
        torch.testing.assert_close(gm(X4), net(X4), rtol=0, atol=1e-6)


def test_train_mode_updates_batchnorm_statistics_like_the_original():
    net = _net()
    gm = fxadapt.capture(net, (X1,))
    net.train()
    gm.train()
    assert gm.get_submodule("stem.1").training and gm.get_submodule("drop").training
    gm.get_submodule("drop").p = net.drop.p = 0.0  # deterministic forward; BN statistics still train
    for _ in range(3):
        torch.testing.assert_close(gm(X4), net(X4), rtol=0, atol=1e-5)
    for name in ("stem.1.running_mean", "stem.1.running_var", "bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(gm.state_dict()[name], net.state_dict()[name], rtol=0, atol=1e-6)
        assert not torch.equal(gm.state_dict()[name], _net().state_dict()[name]), name  # they did move
    assert int(gm.get_submodule("bn").num_batches_tracked) == 3
    gm.eval()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(X4), net(X4), rtol=0, atol=1e-5)


def test_train_mode_gradients_match_the_original():
    net = _net()
    gm = fxadapt.capture(net, (X1,))
    net.train()
    gm.train()
    gm.get_submodule("drop").p = net.drop.p = 0.0
    gm(X4).square().sum().backward()
    net(X4).square().sum().backward()
    for (name, p), (name2, q) in zip(gm.named_parameters(), net.named_parameters()):
        assert name == name2
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_dropout_is_active_in_train_mode_only():
    gm = fxadapt.capture(_net(), (X1,))
    with torch.no_grad():
        assert torch.equal(gm(X4), gm(X4))  # eval: deterministic
        gm.train()
        torch.manual_seed(0)
        a = gm(X4)
        torch.manual_seed(1)
        b = gm(X4)
        assert not torch.equal(a, b)
        gm.get_submodule("drop").p = 0.0
        assert torch.equal(gm(X4), gm(X4))  # BN in train mode is deterministic: dropout made the difference


def test_caller_model_is_not_mutated():
    net = _net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = {k: v for k, v in net.named_parameters()}
    gm = fxadapt.capture(net, (X1,))
    assert net.training and all(m.training for m in net.modules())
    assert gm.training  # the capture follows the caller's mode
    after = net.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p is params[k] for k, p in net.named_parameters())
    assert all(gm.get_parameter(k) is not p for k, p in params.items())  # the capture owns copies
    with torch.no_grad():
        gm.get_parameter("head.weight").zero_()
    assert torch.equal(net.head.weight, before["head.weight"])


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Conv2d(3, 4, 1)
        self.vec = nn.Linear(5, 4)

    def forward(self, inputs, pair):
        a = self.img(inputs["image"]).mean((2, 3))
        b = self.vec(inputs["features"])
        return {"sum": a + b + pair[0], "prod": a * pair[1], "diff": (a - b,)}


def test_pytree_inputs_and_outputs():
    torch.manual_seed(0)
    net = DictNet().eval()
    ex = ({"image": torch.randn(1, 3, 6, 6), "features": torch.randn(1, 5)},
          (torch.randn(1, 4), torch.randn(1, 4)))
    gm = fxadapt.capture(net, ex)
    run = ({"image": torch.randn(3, 3, 6, 6), "features": torch.randn(3, 5)},
           (torch.randn(3, 4), torch.randn(3, 4)))
    out, ref = gm(*run), net(*run)
    assert isinstance(out, dict) and list(out) == ["sum", "prod", "diff"]
    assert isinstance(out["diff"], tuple) and len(out["diff"]) == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_bare_tensor_example_is_accepted():
    net = _net()
    gm = fxadapt.capture(net, X1)
    with torch.no_grad():
        torch.testing.assert_close(gm(X4), net(X4), rtol=0, atol=1e-6)


def test_deepcopy_and_pickle_round_trip():
    net = _net()
    gm = fxadapt.capture(net, (X1,))
    with torch.no_grad():
        ref = gm(X4)
    clone = copy.deepcopy(gm)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(gm))
    for other in (clone, loaded, unpickled):
        assert isinstance(other, nn.Module)
        assert dict(other.named_parameters()).keys() == dict(gm.named_parameters()).keys()
        with torch.no_grad():
            torch.testing.assert_close(other(X4), ref, rtol=0, atol=0)
        other.train()
        other(X4)  # trains (BN statistics move) without touching the source module
    assert torch.equal(gm.state_dict()["bn.running_mean"], net.state_dict()["bn.running_mean"])


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent Python control flow
            return y * 2
        return y


class ToNumpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.from_numpy(self.conv(x).detach().numpy() * 2)


def _line_of(cls, text: str) -> int:
    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("cls, marker", [(DataDependent, "if y.sum() > 0:"), (ToNumpy, ".numpy()")])
def test_untraceable_model_raises_capture_error_naming_the_line(cls, marker):
    model = cls().eval()
    model(X1)  # it does run eagerly: only tracing fails
    with pytest.raises(CaptureError) as info:
        fxadapt.capture(model, (X1,))
    msg = str(info.value)
    assert msg.startswith(f"cannot capture {cls.__name__} to an ATen graph")
    assert f"{__file__}:{_line_of(cls, marker)}" in msg
    assert marker in msg
    assert info.value.__cause__ is not None
    assert isinstance(info.value, fxadapt.FxAdaptError)


def test_analyze_reports_capture_errors_too():
    with pytest.raises(CaptureError):
        fxadapt.analyze(DataDependent(), (X1,))


@pytest.mark.parametrize("bad, words", [
    ([X1], ["tuple", "list", "(x,)"]),
    ({"y": X1}, ["fails on the example inputs", "keywords"]),
    ((3,), ["no tensor"]),
    ((torch.randn(1, 5, 8, 8),), ["fails on the example inputs", "(1, 5, 8, 8)", "channels"]),
    ((X1, X1), ["fails on the example inputs", "argument"]),
])
def test_bad_example_inputs_raise_input_error(bad, words):
    with pytest.raises(InputError) as info:
        fxadapt.capture(_net(), bad)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert isinstance(info.value, ValueError)


def test_non_module_model_is_an_input_error():
    with pytest.raises(InputError, match="must be a torch.nn.Module"):
        fxadapt.capture(lambda x: x, (X1,))
