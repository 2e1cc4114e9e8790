"""``fxadapt adapt --data``: the search runs on the data a user function returns; bad data specs are one-line
errors (exit 2)."""

from __future__ import annotations

import fxadapt
from fxadapt.cli import main


def test_adapt_searches_on_data(tmp_path, capsys):
    out = tmp_path / "m.pt"
    model = ["adapt", "fxadapt.examples:example_model", "--input-shape", "1,3,32,32", "-o", str(out)]
    assert main(model + ["--data", "fxadapt.cli.data:demo_data", "--steps", "3", "--quiet",
                         "--strategy", "dna"]) == 0
    rep = fxadapt.report(fxadapt.load(str(out)))
    assert rep.strategy == "dna" and len(rep.history) == 4
    assert 0.495 <= rep.macs_after / rep.macs_before <= 0.5
    assert "dna search" not in capsys.readouterr().err                     # --quiet silences the search bar
    # without --strategy, data means the importance strategy: --steps are its distillation steps
    assert main(model + ["--data", "fxadapt.cli.data:demo_data", "--steps", "3", "--quiet"]) == 0
    rep = fxadapt.report(fxadapt.load(str(out)))
    assert rep.strategy == "importance" and sum(1 for h in rep.history if "step" in h) == 3
    assert 0.495 <= rep.macs_after / rep.macs_before <= 0.5


def test_bad_data_specs_are_one_line_errors(capsys):
    base = ["adapt", "--example", "--quiet", "-o", "unused.pt"]
    assert main(base + ["--data", "fxadapt.examples:nope"]) == 2
    assert "has no attribute 'nope'" in capsys.readouterr().err
    # returns a model, not (train, val)
    assert main(base + ["--data", "fxadapt.examples:example_model"]) == 2
    assert "must return (train, val)" in capsys.readouterr().err
    assert main(base + ["--strategy", "fur"]) == 2
    assert "give --data" in capsys.readouterr().err
