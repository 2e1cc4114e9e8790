"""``TransformConfig``: every option of ``fxadapt.transform``, checked where it is written.

One source per option: where and how precisely the searches compute is ``TransformConfig.device`` /
``.precision`` (``SearchConfig`` and ``FurConfig`` have neither); how long they search is
``SearchConfig.steps`` (DNA) and ``FurConfig.iterations`` / ``.train_steps`` (FUR). A field typed
``Literal[...]`` takes only those values; a keyword that is no option is refused with the valid ones listed
and, for one that moved, where it lives now (``fxadapt.options``).

Example:
    >>> TransformConfig(strategy="dna").strategy
    'dna'
    >>> TransformConfig(layers="same")
    Traceback (most recent call last):
    fxadapt.errors.InputError: TransformConfig.layers must be one of 'any', 'uniform'; got 'same' ('any': \
per-layer widths, 'uniform': widths shared by repeated layers, so the model's config can state them)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from fxadapt.analysis.hold import Hold
from fxadapt.dist import Precision
from fxadapt.errors import InputError
from fxadapt.options import Options, check_device, unknown_options
from fxadapt.pipeline.recovery import RecoveryConfig, as_recovery, checked_recovery
from fxadapt.planning.solver import SolveConfig
from fxadapt.search.dna import SearchConfig
from fxadapt.search.fur import FurConfig
from fxadapt.search.importance import ImportanceConfig
from fxadapt.train.data import Data, as_mapping, as_tensors, is_batch_list
from fxadapt.train.probe import check_data as check_data_against
from fxadapt.train.probe import check_model

# the keys of fxadapt.pipeline.strategies.STRATEGIES
Strategy = Literal["auto", "datafree", "dna", "fur", "importance"]

MOVED = {"steps": "the step count is the search's: pass search=fxadapt.SearchConfig(steps={value!r}) "
                  "(strategy='fur': fur=fxadapt.FurConfig(iterations=..., train_steps=...)); "
                  "recovery={value!r}: that many weight steps in all, the search's and a fine-tune distilled "
                  "from the original"}


@dataclass(frozen=True)
class TransformConfig(Options):
    """Every option of ``transform``; any field can also be given to ``transform`` as a keyword."""

    moved = MOVED
    hints = {"strategy": "'auto': importance with data, else datafree",
             "attention": "'heads': whole heads, 'head_dim': the head count kept; 'auto': heads with rotary "
                          "embeddings or when written back into the model's modules",
             "precision": "'auto': bf16 autocast on CUDA, fp32 on CPU",
             "output": "'module': the model's own class, 'graph': a torch.fx.GraphModule",
             "write_back": "'auto': fall back to the graph with a WriteBackWarning, 'strict': raise",
             "layers": "'any': per-layer widths, 'uniform': widths shared by repeated layers, so the model's "
                       "config can state them"}

    # "datafree", "dna", "fur", "importance"; "auto": importance with data, else datafree
    strategy: Strategy = "auto"
    attention: Literal["auto", "heads", "head_dim"] = "auto"   # whole heads / head_dim pruned
    fold_bn: bool = False           # fold BatchNorm into conv/linear (a deployable, not a trainable, model)
    # aligned where the budget allows
    solve: SolveConfig = field(default_factory=lambda: SolveConfig(align="auto"))
    search: SearchConfig = field(default_factory=SearchConfig)   # DNA: steps, batch size, gates, ...
    fur: FurConfig = field(default_factory=FurConfig)            # FUR: iterations, train_steps, ...
    # importance: iterations, steps, kind
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    # data-free growth: first add a zero-initialised copy of every repeatable block
    grow_depth: bool = False
    device: str = "cpu"             # where a search runs ("cuda": cuda:LOCAL_RANK under torchrun)
    precision: Precision = "auto"   # search autocast: bf16 on CUDA, fp32 on CPU ("bf16"/"fp32" force it)
    recalibrate_bn: int = 20        # batches of `data` to re-estimate BN statistics with after shrinking
    # the user's own class, the verified graph
    output: Literal["module", "graph", "exported_program"] = "module"
    write_back: Literal["auto", "strict"] = "auto"   # "auto": fall back to the graph with a WriteBackWarning
    # "uniform": repeated layers share widths (a stock config states them)
    layers: Literal["any", "uniform"] = "any"
    atol: float = 1e-5
    rtol: float = 1e-4
    # also run the original model to compare output structure (default: its recorded shapes)
    output_check: bool = False
    progress: Callable | None = None   # progress(step_name, done, total) after every pipeline step
    # what the user holds (fxadapt.analysis.hold; `fxadapt inspect` prints the module names): patterns of
    # module / parameter names, fnmatch wildcards allowed
    keep: tuple[str, ...] = ()      # modules whose sizes never change (every group touching them is frozen)
    only: tuple[str, ...] = ()      # if given: only groups whose modules all match may change
    # pattern -> channels (int) or fraction of the width (float)
    min_width: dict = field(default_factory=dict)
    # pattern -> channels (int) or fraction of the width (float)
    max_width: dict = field(default_factory=dict)
    # weight steps in all, the search's included, the rest a fine-tune distilled from the original (an int,
    # or a RecoveryConfig: lr, kd, temperature, ...; fxadapt.pipeline.recovery); 0: none
    recovery: RecoveryConfig | int = 0

    def __post_init__(self):
        super().__post_init__()
        check_device(type(self).__name__, self.device)
        for name in ("keep", "only"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            self.check(all(isinstance(p, str) and p for p in value), name,
                       "module names or patterns (strings)")
            object.__setattr__(self, name, value)
        for name in ("min_width", "max_width"):
            value = getattr(self, name)
            self.check(isinstance(value, dict) and all(isinstance(p, str) and isinstance(v, (int, float))
                                                      and not isinstance(v, bool) and v > 0
                                                      for p, v in value.items()),
                       name, "a dict of pattern -> channels (int >= 1) or fraction of the width (float > 0)")
        self.check(self.recalibrate_bn >= 0, "recalibrate_bn", "at least 0 (0: no BatchNorm re-estimation)")
        object.__setattr__(self, "recovery", as_recovery(self.recovery))
        for name in ("atol", "rtol"):
            self.check(getattr(self, name) >= 0, name, "at least 0")
        for name, cls in (("solve", SolveConfig), ("search", SearchConfig), ("fur", FurConfig),
                          ("importance", ImportanceConfig)):
            if not isinstance(getattr(self, name), cls):
                raise InputError(f"TransformConfig.{name} must be a fxadapt.{cls.__name__}, got "
                                 f"{type(getattr(self, name)).__name__}")


def hold_of(cfg: TransformConfig) -> Hold:
    """The modules ``cfg`` holds (``fxadapt.analysis.hold``)."""
    return Hold(cfg.keep, cfg.only, dict(cfg.min_width), dict(cfg.max_width))


def transform_config(config: TransformConfig | None, options: dict, data: Any, val_data: Any = None
                     ) -> TransformConfig:
    """``config`` with ``transform``'s keyword ``options`` over it, checked against this machine and the data;
    ``strategy="auto"`` resolved."""
    cfg = config or TransformConfig()
    valid = [f.name for f in dataclasses.fields(TransformConfig)]
    if set(options) - set(valid):
        raise InputError(unknown_options("transform", options, valid, MOVED))
    cfg = dataclasses.replace(cfg, **options)
    strategy = ("importance" if data is not None else "datafree") if cfg.strategy == "auto" else cfg.strategy
    if strategy in ("dna", "fur", "importance") and data is None:
        raise InputError(f"strategy {strategy!r} searches on data: pass data=(inputs, targets), a Dataset or "
                         f"a DataLoader (or strategy='datafree')")
    check_device_here(cfg.device)
    for name, value in (("data", data), ("val_data", val_data)):
        check_data(name, value)
    return checked_recovery(dataclasses.replace(cfg, strategy=strategy), data)


def checked_data(model: Any, example_inputs: Any, data: Any, val_data: Any, cfg: TransformConfig) -> tuple:
    """The model and its data checked before any work (``fxadapt.train.probe``): ``(data, val_data)`` as
    ``fxadapt.train.data.Data`` (how a batch calls the model, what its targets are); labels and the loss are
    checked for the searches only (the data-free solver reads data for BatchNorm statistics alone)."""
    check_model(model)
    loss = {"dna": cfg.search.loss_fn, "fur": cfg.fur.loss_fn}.get(cfg.strategy)
    if cfg.strategy not in ("dna", "fur", "datafree"):
        loss = getattr(getattr(cfg, cfg.strategy, None), "loss_fn", torch.nn.functional.cross_entropy)
    if loss is None and as_recovery(cfg.recovery).steps > 0:    # the recovery's fine-tune reads the labels
        loss = as_recovery(cfg.recovery).loss_fn or torch.nn.functional.cross_entropy
    return (check_data_against(model, example_inputs, data, "data", loss),
            check_data_against(model, example_inputs, val_data, "val_data", loss))


def check_device_here(device: str) -> None:
    """A device this machine has (a CUDA request without CUDA names what there is)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise InputError(f"device={device!r}, but this machine has no CUDA device (torch {torch.__version__} "
                         f"is {build}); devices here: cpu. Pass device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device={device!r}, but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")


def check_data(name: str, data: Any) -> None:
    """Training / validation data in a form the searches read: ``(inputs, targets)`` tensors, inputs alone, a
    dict of tensors, a Dataset, a DataLoader or a list of batches (``fxadapt.train.data``)."""
    if (data is None or isinstance(data, (Data, Dataset, DataLoader)) or as_tensors(data) is not None
            or as_mapping(data) is not None or is_batch_list(data)):
        return
    what = type(data).__name__
    if isinstance(data, (list, tuple)):
        what += " of " + ", ".join(sorted({type(v).__name__ for v in data})) if data else " (empty)"
    raise InputError(f"{name} must be (inputs, targets) tensors, a torch Dataset or a DataLoader; got a "
                     f"{what}: e.g. {name}=(x_train, y_train) with x_train = torch.stack(images), y_train = "
                     "torch.tensor(labels)")
