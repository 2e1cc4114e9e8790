"""``fxadapt.export.save``: a transformed or captured model round-trips through plain ``torch.load`` data."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.examples import EXAMPLE_INPUT_SHAPE, example_model
from fxadapt.export.save import FORMAT, SaveError, load, save


class Mixed(nn.Module):
    """Every standard module the lifter produces, with token ids in and a dict out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.ln = nn.LayerNorm(8)
        self.conv = nn.Conv2d(1, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(2, 6)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.ln(self.emb(ids))                      # (B, 8, 8)
        h = self.gn(torch.relu(self.bn(self.conv(h[:, None]))))
        h = self.up(h).mean(dim=(2, 3))
        return {"logits": self.fc(self.drop(h)), "pooled": h}


@pytest.fixture(scope="module")
def adapted():
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    return fxadapt.transform(example_model(), 0.5, (x,), output="graph"), x   # the GraphModule format


def test_transform_result_round_trips(adapted, tmp_path):
    model, x = adapted
    path = tmp_path / "small.pt"
    save(model, path)
    again = load(path)
    assert isinstance(again, torch.fx.GraphModule)
    assert dict(again.named_parameters()).keys() == dict(model.named_parameters()).keys()
    torch.testing.assert_close(again.state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(again(torch.randn(3, *x.shape[1:])).shape, torch.Size([3, 10]))
    assert fxadapt.report(again) == fxadapt.report(model)


def test_file_is_plain_torch_load_data(adapted, tmp_path):
    path = tmp_path / "small.pt"
    save(adapted[0], path)
    data = torch.load(path)  # torch's defaults: weights_only=True
    assert data["format"] == FORMAT
    assert torch.load(path, weights_only=True)["graph"][0]["op"] == "placeholder"
    assert not list(tmp_path.glob("*.tmp"))


def test_mixed_modules_train_eval_and_structures(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 8))
    gm = fxadapt.capture(Mixed(), (ids,))
    save(gm, tmp_path / "m.pt")
    again = load(tmp_path / "m.pt")
    kinds = {type(m).__name__ for m in again.modules()}
    assert {"Embedding", "LayerNorm", "Conv2d", "BatchNorm2d", "GroupNorm", "ConvTranspose2d", "Linear"} \
            <= kinds
    gm.eval(), again.eval()
    a, b = gm(ids), again(ids)
    assert set(b) == {"logits", "pooled"}
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    gm.train(), again.train()
    torch.manual_seed(1)
    a = gm(ids)
    torch.manual_seed(1)
    b = again(ids)
    torch.testing.assert_close(b, a, rtol=0, atol=0)           # dropout and BN batch statistics alike
    torch.testing.assert_close(again.get_submodule(_bn(again)).running_mean,
                               gm.get_submodule(_bn(gm)).running_mean, rtol=0, atol=0)


def _bn(gm) -> str:
    return next(n for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d))


def test_loaded_model_trains_saves_again_and_pickles(adapted, tmp_path):
    model, x = adapted
    save(model, tmp_path / "a.pt")
    again = load(tmp_path / "a.pt").train()
    opt = torch.optim.SGD(again.parameters(), lr=0.1)
    before = next(again.parameters()).detach().clone()
    again(x).sum().backward()
    opt.step()
    assert not torch.equal(next(again.parameters()), before)
    save(again, tmp_path / "b.pt")
    torch.testing.assert_close(load(tmp_path / "b.pt").eval()(x), again.eval()(x), rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(again))(x), again(x), rtol=0, atol=0)


def test_symbolic_trace_functions_round_trip(tmp_path):
    gm = torch.fx.symbolic_trace(example_model().eval())  # torch.relu, torch.flatten, operator.add, F.*
    save(gm, tmp_path / "s.pt")
    x = torch.randn(EXAMPLE_INPUT_SHAPE)
    torch.testing.assert_close(load(tmp_path / "s.pt")(x), gm(x), rtol=0, atol=0)


def test_tied_parameters_stay_tied(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    gm = torch.fx.symbolic_trace(model)
    save(gm, tmp_path / "t.pt")
    again = load(tmp_path / "t.pt")
    assert getattr(again, "0").weight is getattr(again, "2").weight
    x = torch.randn(2, 4)
    torch.testing.assert_close(again(x), gm(x), rtol=0, atol=0)


def test_refuses_what_it_cannot_store(tmp_path):
    with pytest.raises(SaveError, match="stores a torch.fx.GraphModule"):
        save(example_model(), tmp_path / "x.pt")
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
    gm.add_submodule("custom", example_model())  # not a torch.nn class
    with pytest.raises(SaveError, match="torch.nn modules only"):
        save(gm, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_load_errors_are_fxadapt_errors(tmp_path):
    with pytest.raises(SaveError, match="no such file"):
        load(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(SaveError, match="not a model saved by fxadapt.save"):
        load(tmp_path / "other.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(SaveError, match="was it written by fxadapt.save"):
        load(tmp_path / "pickled.pt")
    assert issubclass(SaveError, fxadapt.FxAdaptError)


def test_load_refuses_foreign_classes_and_functions(adapted, tmp_path):
    from fxadapt.export.save import from_dict, to_dict

    data = to_dict(adapted[0])
    bad = {**data, "modules": [{**data["modules"][0], "class": "os.system"}] + data["modules"][1:]}
    with pytest.raises(SaveError, match="only torch.nn classes"):
        from_dict(bad)
    nodes = [dict(n) for n in data["graph"]]
    i = next(k for k, n in enumerate(nodes) if n["op"] == "call_function")
    nodes[i]["target"] = "os.system"
    with pytest.raises(SaveError, match="unknown function 'os.system'"):
        from_dict({**data, "graph": nodes})
    for name in ("operator.attrgetter", "torch.load", "builtins.eval"):
        nodes[i]["target"] = name
        with pytest.raises(SaveError, match="unknown function"):
            from_dict({**data, "graph": nodes})
