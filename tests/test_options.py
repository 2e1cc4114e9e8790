"""Options a newcomer cannot misuse: one source for device / precision / steps (a keyword in the wrong place
is a one-line error saying where it goes), and every config checked where it is written (``Literal`` fields,
ranges), each refusal naming the field, the value and what is allowed."""

from __future__ import annotations

import typing

import pytest
import torch
from models import ResNetTiny

import fxadapt
from fxadapt import dist
from fxadapt.errors import InputError, SearchConfigError, SearchInterrupted
from fxadapt.pipeline import strategies
from fxadapt.pipeline.config import Strategy
from fxadapt.search.dna import dna

X1 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
gen = torch.Generator().manual_seed(0)
DATA = (torch.randn(32, 3, 8, 8, generator=gen), torch.randint(0, 5, (32,), generator=gen))


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_steps_on_transform_says_to_pass_a_search_config():
    with pytest.raises(InputError) as e:
        fxadapt.transform(ResNetTiny().eval(), 0.5, (X1,), data=DATA, steps=300)
    msg = _one_line(e)
    assert msg.startswith("unknown transform option 'steps': the step count is the search's: pass "
                          "search=fxadapt.SearchConfig(steps=300)")
    assert msg.endswith("valid: strategy, attention, fold_bn, solve, search, fur, importance, grow_depth, "
                        "device, precision, recalibrate_bn, output, write_back, layers, atol, rtol, "
                        "output_check, progress, keep, only, min_width, max_width, recovery")
    with pytest.raises(InputError,
                       match=r"unknown TransformConfig option 'steps': .*SearchConfig\(steps=3\)"):
        fxadapt.TransformConfig(steps=3)


def test_an_unknown_option_lists_the_valid_ones():
    with pytest.raises(InputError, match=r"unknown transform option 'fold_bm': valid: strategy, attention, "):
        fxadapt.transform(ResNetTiny().eval(), 0.5, (X1,), fold_bm=True)


@pytest.mark.parametrize("cls", [fxadapt.SearchConfig, fxadapt.FurConfig])
@pytest.mark.parametrize("option, value", [("device", "cuda"), ("precision", "bf16")])
def test_device_and_precision_live_on_the_transform(cls, option, value):
    with pytest.raises(SearchConfigError) as e:
        cls(**{option: value})
    msg = _one_line(e)
    assert msg.startswith(f"unknown {cls.__name__} option '{option}': ")
    assert f"fxadapt.transform(..., {option}={value!r}) or fxadapt.TransformConfig({option}={value!r})" in msg


def test_fur_steps_name_its_own_counts():
    with pytest.raises(SearchConfigError, match="FUR's step counts are iterations= and train_steps="):
        fxadapt.FurConfig(steps=3)


@pytest.mark.parametrize("strategy", ["dna", "fur"])
def test_the_transform_device_and_precision_reach_the_search(monkeypatch, strategy):
    seen = {}

    def spy(a, target, data, val_data, cfg, ctx):
        seen.update(cfg=cfg, ctx=ctx)
        raise SearchInterrupted("spied")

    monkeypatch.setattr(strategies, strategy, spy)
    search = fxadapt.SearchConfig(steps=7, progress=False)
    with pytest.raises(SearchInterrupted):
        fxadapt.transform(ResNetTiny().eval(), 0.5, (X1,), data=DATA, strategy=strategy, precision="fp32",
                          search=search)
    assert (seen["ctx"].device, seen["ctx"].precision) == ("cpu", "fp32")
    assert strategy == "fur" or seen["cfg"].steps == 7


def test_dna_called_directly_takes_its_context():
    a = fxadapt.analyze(ResNetTiny().eval(), (X1,))
    cfg = fxadapt.SearchConfig(steps=3, warmup=1, batch_size=16, progress=False)
    plain, plan, _, state = dna(a, 0.5 * a.macs(), DATA, None, cfg, ctx=dist.setup("cpu", "fp32"))
    assert plain is not None and len(state.history) == 4


@pytest.mark.parametrize("make, error, message", [
    (lambda: fxadapt.TransformConfig(strategy="magic"), InputError,
     "TransformConfig.strategy must be one of 'auto', 'datafree', 'dna', 'fur', 'importance'; got 'magic'"),
    (lambda: fxadapt.TransformConfig(precision="fp16"), InputError,
     "TransformConfig.precision must be one of 'auto', 'bf16', 'fp32'; got 'fp16'"),
    (lambda: fxadapt.TransformConfig(device="tpu9"), InputError,
     "TransformConfig.device: unknown device 'tpu9'"),
    (lambda: fxadapt.TransformConfig(recalibrate_bn=-1), InputError,
     "TransformConfig.recalibrate_bn must be at least 0"),
    (lambda: fxadapt.TransformConfig(search={"steps": 3}), InputError,
     "TransformConfig.search must be a fxadapt.SearchConfig, got dict"),
    (lambda: fxadapt.FurConfig(noise="uniform"), SearchConfigError,
     "FurConfig.noise must be one of 'gaussian', 'bernoulli'; got 'uniform'"),
    (lambda: fxadapt.FurConfig(iterations=0), SearchConfigError,
     "FurConfig.iterations must be at least 1; got 0"),
    (lambda: fxadapt.FurConfig(supernet=fxadapt.SupernetConfig(gates="topk")), SearchConfigError,
     "FurConfig.supernet.gates must be 'markov'"),
    (lambda: fxadapt.SupernetConfig(gates="bernoulli"), SearchConfigError,
     "SupernetConfig.gates must be one of 'markov', 'gumbel', 'topk'; got 'bernoulli'"),
    (lambda: fxadapt.SupernetConfig(expand=0.5), SearchConfigError,
     "SupernetConfig.expand must be at least 1.0"),
    (lambda: fxadapt.SearchConfig(gate_init="zeros"), SearchConfigError,
     "SearchConfig.gate_init must be one of 'budget', 'uniform'; got 'zeros'"),
    (lambda: fxadapt.FinetuneConfig(precision="fp16"), InputError,
     "FinetuneConfig.precision must be one of 'auto', 'bf16', 'fp32'; got 'fp16'"),
    (lambda: fxadapt.FinetuneConfig(device="gpu"), InputError, "FinetuneConfig.device: unknown device 'gpu'"),
    (lambda: fxadapt.FinetuneConfig(kd=2.0), InputError, r"FinetuneConfig.kd must be in \[0, 1\]"),
    (lambda: dist.DistContext(precision="half"), InputError, "DistContext.precision must be one of"),
])
def test_configs_are_checked_where_they_are_written(make, error, message):
    with pytest.raises(error, match=message) as e:
        make()
    _one_line(e)


def test_a_cuda_config_can_be_written_on_a_cpu_machine():
    """The device's shape is checked at construction; whether this machine has it, when the work starts."""
    assert fxadapt.TransformConfig(device="cuda:1").device == "cuda:1"
    assert fxadapt.FinetuneConfig(device="cuda").device == "cuda"


def test_strategy_values_are_the_strategies():
    assert set(typing.get_args(Strategy)) == {"auto"} | set(strategies.STRATEGIES)


def test_finetune_keeps_its_own_device_and_precision():
    m = torch.nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    fxadapt.finetune(m, (x, y), epochs=1, cfg=fxadapt.FinetuneConfig(batch_size=16, precision="fp32"))
    assert not m.training


def test_cli_flags_map_to_the_one_place_of_each_option():
    import argparse

    from fxadapt.cli.common import CliError
    from fxadapt.cli.data import add_data_arguments, load_data

    p = argparse.ArgumentParser()
    add_data_arguments(p)
    data = ["--data", "fxadapt.cli.data:demo_data"]
    _, _, options = load_data(p.parse_args(data + ["--steps", "5", "--precision", "fp32"]))
    cfg = fxadapt.TransformConfig(**options)
    assert (cfg.importance.steps, cfg.device, cfg.precision, cfg.strategy) == (5, "cpu", "fp32", "importance")
    _, _, options = load_data(p.parse_args(data + ["--steps", "5", "--strategy", "dna"]))
    cfg = fxadapt.TransformConfig(**options)
    assert (cfg.search.steps, cfg.strategy) == (5, "dna")
    with pytest.raises(CliError, match="--steps sets the importance or DNA search's steps"):
        load_data(p.parse_args(data + ["--strategy", "fur", "--steps", "5"]))
