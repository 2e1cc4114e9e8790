"""``fxadapt inspect``: table and JSON on the bundled example and a zoo model, file factories, error exits."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types

import pytest

import fxadapt
from fxadapt import cli
from fxadapt.cli import main


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("inspect") / "example.json"
    rc, out, err = _run(["inspect", "--example", "--json", str(path)])
    return rc, out, err, json.loads(path.read_text())


def test_inspect_example_table(example_run):
    rc, out, err, _ = example_run
    assert rc == 0, err
    assert out.startswith("model example  input 1x3x32x32")
    for text in ("MACs elasticity", "% change of the model's MACs per 1% change", "stem.0", "stage2.1.se.fc1",
                 "frozen: output: reaches the model output",
                 "skip path is not the identity (projection shortcut)", "totals: MACs 18,268,992",
                 "groups 8: 7 prunable, 1 frozen", "blocks 4: 3 removable", "time: capture"):
        assert text in out, text


def test_inspect_example_json(example_run):
    _, out, _, data = example_run
    assert "wrote " in out
    assert data["model"] == "example" and data["input_shapes"] == [[1, 3, 32, 32]]
    assert data["macs"] == 18268992 and data["params"] == 43778
    groups = data["groups"]
    assert [g["id"] for g in groups] == list(range(8))
    assert sum(g["prunable"] for g in groups) == 7
    stem = groups[0]
    assert (stem["name"], stem["width"], stem["granularity"], stem["reason"]) == ("stem.0", 16, 1, None)
    assert 0.5 < stem["macs_elasticity"] == stem["macs_share"] < 0.7
    producer = stem["members"][0]
    assert producer == {"kind": "param", "role": "out", "node": "stem_0", "target": "stem.0.weight",
                        "axis": 0, "positions": 16}
    assert groups[-1]["name"] == "head" and not groups[-1]["prunable"] and "output" in groups[-1]["reason"]
    blocks = data["blocks"]
    assert len(blocks) == 4 and sum(b["removable"] for b in blocks) == 3
    assert blocks[2]["reason"] == "skip path is not the identity (projection shortcut)"
    assert all(isinstance(b["body"], list) and b["body"] for b in blocks)
    assert set(data["timing_s"]) == {"capture", "analysis"}




def test_inspect_pytorchcv_resnet20():
    pytest.importorskip("pytorchcv")
    rc, out, err = _run(["inspect", "pytorchcv.models.resnet_cifar:resnet20_cifar10", "--input-shape",
                         "1,3,32,32"])
    assert rc == 0, err
    assert "features.init_block.conv" in out and "features.stage3.unit1.identity_conv.conv" in out
    assert "groups 13: 12 prunable, 1 frozen" in out
    assert "blocks 9: 7 removable" in out


FACTORY_FILE = """
import torch
def build():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Conv2d(8, 4, 1))
def not_a_module():
    return 42
def broken():
    raise RuntimeError("no weights here")
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(FACTORY_FILE)
    return path


def test_inspect_file_factory(factory_file):
    rc, out, err = _run(["inspect", f"{factory_file}:build", "--input-shape", "1,3,16,16"])
    assert rc == 0, err
    assert f"model {factory_file}:build  input 1x3x16x16" in out
    assert "groups 2: 1 prunable, 1 frozen" in out


def test_inspect_json_stdout_is_pure_json(factory_file):
    rc, out, _ = _run(["inspect", f"{factory_file}:build", "--input-shape", "1,3,16,16", "--json", "-"])
    assert rc == 0
    data = json.loads(out)
    assert [(g["name"], g["width"], g["prunable"]) for g in data["groups"]] \
            == [("0", 8, True), ("3", 4, False)]


@pytest.mark.parametrize("argv, message", [
    (["nocolon", "--input-shape", "1,3,8,8"], "bad model spec 'nocolon': expected MODULE:FACTORY"),
    (["fxadapt.examples:", "--input-shape", "1,3,8,8"], "bad model spec"),
    (["no_such_module_xyz:f", "--input-shape", "1,3,8,8"],
     "cannot import 'no_such_module_xyz': ModuleNotFoundError"),
    (["/no/such/file.py:f", "--input-shape", "1,3,8,8"], "cannot import '/no/such/file.py': no such file"),
    (["fxadapt.examples:nope", "--input-shape", "1,3,8,8"], "'fxadapt.examples' has no attribute 'nope'"),
    (["fxadapt.examples:EXAMPLE_INPUT_SHAPE", "--input-shape", "1,3,8,8"], "is not callable"),
    (["fxadapt.examples:example_model"], "--input-shape is required"),
    (["--example", "--input-shape", "1,3,x"], "bad input shape '1,3,x'"),
    (["--example", "--input-shape", "1,0,32,32"], "bad input shape"),
    (["--example", "--input-shape", "1,4,32,32"], "ExampleResNet fails on the example inputs"),  # InputError
    (["--example", "fxadapt.examples:example_model"], "either MODEL or --example"),
    ([], "no model"),
])
def test_inspect_errors_exit_2_with_one_line(argv, message):
    rc, out, err = _run(["inspect", *argv])
    assert rc == 2
    assert err.startswith("fxadapt inspect: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("factory, message", [
    ("not_a_module", "returned int, expected a torch.nn.Module"),
    ("broken", "raised RuntimeError: no weights here"),
])
def test_inspect_bad_factories(factory_file, factory, message):
    rc, _, err = _run(["inspect", f"{factory_file}:{factory}", "--input-shape", "1,3,8,8"])
    assert rc == 2 and message in err and err.count("\n") == 1


def test_fxadapt_error_is_one_line(monkeypatch):
    def fail(*_, **__):
        raise fxadapt.CaptureError("cannot capture M: boom\n  at m.py:3 in forward: x.item()")

    monkeypatch.setattr(fxadapt, "capture", fail)
    rc, _, err = _run(["inspect", "--example"])
    assert rc == 2
    assert err == "fxadapt inspect: error: cannot capture M: boom; at m.py:3 in forward: x.item()\n"


def test_subcommand_registry_is_pluggable(monkeypatch):
    mod = types.ModuleType("fxadapt_fake_subcommand")

    def add_parser(sub):
        p = sub.add_parser("fake")
        p.add_argument("--n", type=int, default=3)
        p.set_defaults(run=lambda args: args.n)

    mod.add_parser = add_parser
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, mod.__name__])
    assert main(["fake", "--n", "5"]) == 5
    assert _run([])[0] == 2  # no subcommand: help on stderr, usage exit status


def test_python_m_fxadapt_error_exit():
    proc = subprocess.run([sys.executable, "-m", "fxadapt", "inspect", "bad-spec"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fxadapt inspect: error: bad model spec 'bad-spec': expected MODULE:FACTORY or FILE.py:FACTORY, "
        "e.g. pytorchcv.models.resnet:resnet50"]
