"""``fxadapt adapt``: adapt a model to a budget, print the report, save it, export ONNX, plot widths.

Usage::

    fxadapt adapt --example                       # bundled model, budget 0.5, outputs in fxadapt-example/
    fxadapt adapt pkg.module:factory --budget 0.5 --input-shape 1,3,224,224 [-o adapted.pt] \\
        [--onnx adapted.onnx] [--plot widths.png] [--out-dir DIR] [--fold-bn]
    fxadapt adapt --example --data fxadapt.cli.data:demo_data --steps 20     # importance on data
    torchrun --nproc_per_node=2 -m fxadapt adapt ... --data my_data.py:load  # distributed (fxadapt.cli.data)
    fxadapt adapt my_bert.py:build --input-shape 1,128:int64:0-30522    # token ids (see fxadapt.cli.common)

Outputs: ``-o`` names the saved model; without it the model goes to ``DIR/adapted.pt`` with ``--out-dir``
(``fxadapt-example/`` with ``--example``, together with ``adapted.onnx`` and ``widths.png``), else to
``<factory>-adapted.pt`` in the current directory. Every file written is printed. Folders are created only
when a file is written into them, so a failed run leaves none behind. A Hugging Face checkpoint folder in
gives one out (``-o``, streamed or not: ``fxadapt.cli.hf``), written into a folder beside it that is renamed
when complete; a non-empty ``-o`` is refused unless ``--overwrite``; ``--layers uniform`` makes it load with
stock ``from_pretrained``.

The model file holds plain data (``fxadapt.save``): read it back with ``fxadapt.load(path)``
(``fxadapt.export.save.load``); ``torch.load(path)`` with its defaults returns that data. The ONNX file
is simplified and checked against onnxruntime.

BatchNorm: the adapted model keeps its BatchNorm layers (ready for fine-tuning) unless ``--fold-bn`` folds
them into the preceding convolutions (a deployable model); ONNX export folds them either way.
``--no-fold-bn`` is accepted for compatibility and does nothing (keeping BN is the default).

The budget is checked before the model is loaded or captured. A progress bar counts the pipeline's
passes (as ``TransformConfig.progress`` reports them) and then the save, export and plot steps.

Example:
    >>> import tempfile, os
    >>> from fxadapt.cli import main
    >>> d = tempfile.mkdtemp()
    >>> main(["adapt", "--example", "--out-dir", d, "--quiet"])
    0
    >>> sorted(os.listdir(d))
    ['adapted.onnx', 'adapted.pt', 'widths.png']
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import fxadapt
from fxadapt.cli import hf
from fxadapt.cli.common import CliError, add_model_arguments, load_model, split_spec
from fxadapt.cli.data import add_data_arguments, load_data
from fxadapt.cli.hf import is_checkpoint
from fxadapt.dist import is_main
from fxadapt.export.plot import plot_widths
from fxadapt.export.save import save
from fxadapt.export.shards import check_output, staged
from fxadapt.pipeline.transform import TransformConfig
from fxadapt.planning.budget import parse_budget


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``adapt`` on the subparsers object of the top-level parser."""
    p = sub.add_parser("adapt", help="adapt a model to a MAC budget (shrink or grow), export ONNX",
                       description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--budget", default="0.5",
                   help="fraction of the original MACs (0.5, 1.5), '50%%', or MACs "
                                                   "like '300M' (default 0.5)")
    p.add_argument("-o", "--output", help="where to save the adapted model (default: DIR/adapted.pt with "
                                          "--out-dir or --example, else <factory>-adapted.pt)")
    p.add_argument("--onnx", help="also export ONNX here (simplified, checked with onnxruntime)")
    p.add_argument("--plot", help="write a PNG of per-group widths, original vs adapted")
    p.add_argument("--out-dir", help="directory for adapted.pt, adapted.onnx and widths.png "
                                     "(with --example: fxadapt-example)")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold BatchNorm into the preceding convolutions (deployable; default: keep BN)")
    p.add_argument("--no-fold-bn", action="store_true",
                   help="keep BatchNorm (the default; accepted for compatibility, does nothing)")
    p.add_argument("--grow-depth", action="store_true",
                   help="when growing, also add one zero-initialised copy of every repeatable block")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report on stdout")
    p.add_argument("--stream", action="store_true",
                   help="a Hugging Face checkpoint: adapt it without loading it (meta model, tensors read "
                        "one at a time, written shard by shard); automatic above half the available memory")
    p.add_argument("--max-shard-size", default="5GB",
                   help="shard size of a streamed checkpoint (default 5GB)")
    p.add_argument("--layers", choices=("any", "uniform"), default="any",
                   help="'any' (default): per-layer widths; 'uniform': repeated layers share widths, so a "
                        "Hugging Face checkpoint loads with stock from_pretrained")
    p.add_argument("--overwrite", action="store_true",
                   help="write a checkpoint folder into a non-empty -o (its weight files are replaced; "
                        "default: refused)")
    add_data_arguments(p)
    p.set_defaults(run=run)
    return p


def check_budget(text: str) -> float | str:
    """The budget as ``transform`` takes it, validated without the model.

    >>> check_budget("0.5"), check_budget("300M")
    (0.5, '300M')
    >>> check_budget("abc")
    Traceback (most recent call last):
    ...
    fxadapt.errors.BudgetError: cannot read budget 'abc': use a fraction (0.5), a percentage ('50%') or MACs
    with a suffix ('300M', '1.2G')
    """
    try:
        budget: float | str = float(text)
    except ValueError:
        budget = text
    parse_budget(budget, 1.0, 1.0)
    return budget


def output_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``[(kind, path)]`` for the files to write: kind ``pt``, ``onnx`` or ``png`` (see the module doc).

    >>> ns = argparse.Namespace(example=False, model="pkg.zoo:resnet8", out_dir=None, output=None, onnx=None,
    ...                         plot="w.png")
    >>> output_paths(ns)
    [('pt', 'resnet8-adapted.pt'), ('png', 'w.png')]
    """
    if is_checkpoint(args.model):   # a save_pretrained directory in, one out
        given = {"hf": args.output or args.out_dir or os.path.normpath(args.model) + "-adapted",
                 "onnx": args.onnx, "png": args.plot}
        return [(k, v) for k, v in given.items() if v]
    out_dir = args.out_dir or ("fxadapt-example" if args.example else None)
    defaults = {"pt": "adapted.pt", "onnx": "adapted.onnx", "png": "widths.png"}
    given = {"pt": args.output, "onnx": args.onnx, "png": args.plot}
    if out_dir:
        return [(k, given[k] or os.path.join(out_dir, name)) for k, name in defaults.items()]
    if not given["pt"]:
        factory = split_spec(args.model)[1].rpartition(".")[2]
        given["pt"] = f"{factory}-adapted.pt"
    return [(k, v) for k, v in given.items() if v]


def run(args: argparse.Namespace) -> int:
    """Validate, adapt, report, write; returns the exit status (errors raise
    ``CliError``/``FxAdaptError``)."""
    budget = check_budget(args.budget)
    if is_checkpoint(args.model):   # a checkpoint folder out: refused before any work if it is not empty
        check_output(output_paths(args)[0][1], args.overwrite)
        if hf.streams(args):
            return hf.adapt_streamed(args, budget, output_paths(args)[0][1],
                                     load_data(args)[0] if args.data else None)
    model, inputs, label = load_model(args)
    train, val, search = load_data(args)
    if args.fold_bn:
        model.eval()  # folding uses the running statistics: the deployable model is an inference model
    outputs = output_paths(args)
    bar = Progress(f"adapt {label}", extra_steps=len(outputs), enabled=not args.quiet and is_main())
    cfg = TransformConfig(fold_bn=args.fold_bn, grow_depth=args.grow_depth, layers=args.layers, progress=bar,
                          **search)
    created: list[str] = []
    try:
        adapted = fxadapt.transform(model, budget, inputs, data=train, val_data=val, config=cfg)
        if not is_main():  # under torchrun every rank holds the same model; rank 0 reports and writes
            return 0
        bar.pipeline_done()
        rep = fxadapt.report(adapted)
        bar.write(f"{rep.table()}\nMACs ratio {rep.macs_after / rep.macs_before:.4f} "
                  f"(target {rep.macs_target / rep.macs_before:.4f})")
        writers: dict[str, Callable[[str], str]] = {
            "pt": lambda p: (save(adapted, p), f"saved {p} (load with fxadapt.load)")[1],
            "hf": lambda p: _save_pretrained(adapted, p, args.overwrite),
            "onnx": lambda p: _onnx_line(fxadapt.export_onnx(adapted, inputs, p)),
            "png": lambda p: (plot_widths(rep, p), f"plot {p}")[1],
        }
        for kind, path in outputs:
            _make_parent(path, created)
            bar.label(STEP_NAMES[kind])
            bar.write(writers[kind](path))
            bar.step(STEP_NAMES[kind])
    except BaseException:
        _remove_empty(created)
        raise
    finally:
        bar.close()
    return 0


STEP_NAMES = {"pt": "save", "hf": "save_pretrained", "onnx": "ONNX export", "png": "plot"}


def _save_pretrained(model, path: str, overwrite: bool) -> str:
    """Into a folder beside ``path`` that becomes ``path`` once complete (``shards.staged``)."""
    graph = not hasattr(model, "save_pretrained")   # the write-back fell back to the graph (a warning said)
    with staged(path, overwrite) as tmp:
        save(model, os.path.join(tmp, "adapted.pt")) if graph else model.save_pretrained(tmp)
    if graph:
        return f"saved {path}/adapted.pt (the graph: see the WriteBackWarning; load with fxadapt.load)"
    how = ("fxadapt.from_pretrained" if getattr(model.config, "fxadapt_recipe", None)
           else "transformers' from_pretrained or fxadapt.from_pretrained")
    return f"saved {path} (save_pretrained; load with {how})"


class Progress:
    """The tqdm bar: ``TransformConfig.progress`` calls it once per pipeline pass, as ``(name, done, total)``
    (or, from older pipelines, ``(name)``); the CLI then adds its own steps (save, ONNX export, plot).

    >>> p = Progress("demo", extra_steps=1, enabled=False)
    >>> p("capture", 1, 2); p("verify", 2, 2); p.pipeline_done(); p.step("save")
    >>> p.done, p.total
    (3, 3)
    """

    def __init__(self, desc: str, extra_steps: int, enabled: bool = True):
        self.extra, self.done = extra_steps, 0
        self.total: int | None = None
        self.bar = None
        if enabled:
            from tqdm import tqdm  # deferred: progress bars load only when shown

            self.bar = tqdm(total=None, desc=desc, unit="step", leave=True)

    def __call__(self, name: str, *counts: int) -> None:
        if len(counts) == 2:
            done, total = counts
            self._set(done, total + self.extra, name)
        else:
            self._set(self.done + 1, None, name)

    def pipeline_done(self) -> None:
        """The pipeline returned: from now on only the CLI's own steps remain."""
        self._set(self.done, self.done + self.extra, "")

    def step(self, name: str) -> None:
        self._set(self.done + 1, self.total, name)

    def _set(self, done: int, total: int | None, name: str) -> None:
        self.done, self.total = done, total if total is not None else self.total
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_postfix_str(name, refresh=False)
            self.bar.update(done - self.bar.n)

    def label(self, name: str) -> None:
        """Show ``name`` as the step running now."""
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def write(self, text: str) -> None:
        """Print ``text`` above the bar (nothing when the bar is disabled, i.e. ``--quiet``)."""
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _onnx_line(res) -> str:
    return f"ONNX {res.path}: {res.nodes} nodes, simplified, onnxruntime max |diff| {res.max_abs_diff:.2e}"


def _make_parent(path: str, created: list[str]) -> None:
    """Create the folders above ``path`` that are missing, remembering them (deepest last)."""
    parent = os.path.dirname(os.path.abspath(path))
    missing = []
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except OSError as e:
            raise CliError(f"cannot create folder {d!r} for {path!r}: {e.strerror or e}") from e
        created.append(d)


def _remove_empty(created: list[str]) -> None:
    for d in reversed(created):
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
