"""The ``fxadapt`` command line (``fxadapt ...`` or ``python -m fxadapt ...``).

Each subcommand lives in its own module listed in ``SUBCOMMANDS``; such a module defines

- ``add_parser(sub)``: add its parser to the ``argparse`` subparsers object ``sub`` and
  ``set_defaults(run=run)`` on it;
- ``run(args) -> int``: do the work, raising ``cli.common.CliError`` (or an ``fxadapt.FxAdaptError``) for
  anything the user got wrong.

``main`` turns those errors into one line on stderr and exit status 2; other exceptions are bugs and keep
their traceback (so does ``fxadapt.InternalError``, a pipeline step's bug, with the original chained).
Adding a subcommand (say ``adapt``) is one module plus one entry in ``SUBCOMMANDS``.

Example:
    >>> main(["inspect", "--example"])  # doctest: +ELLIPSIS
    model example  input 1x3x32x32
    ...
    0
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from fxadapt import __version__
from fxadapt.cli.common import CliError, one_line
from fxadapt.errors import FxAdaptError, InternalError

SUBCOMMANDS: list[str] = ["fxadapt.cli.inspect", "fxadapt.cli.adapt", "fxadapt.cli.bench"]

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per module in ``SUBCOMMANDS``.

    >>> sorted(build_parser()._subparsers._group_actions[0].choices)
    ['adapt', 'bench', 'inspect']
    """
    parser = argparse.ArgumentParser(
        prog="fxadapt", description="Adapt a PyTorch model's widths and depths to a compute budget.")
    parser.add_argument("--version", action="version", version=f"fxadapt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    >>> main(["inspect", "--example", "--input-shape",
    ...       "1,3,x"])  # stderr: fxadapt inspect: error: bad input shape ...
    2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    with warnings.catch_warnings():   # torch-internal deprecation chatter, for this command only (no
        warnings.filterwarnings("ignore", category=FutureWarning)   # process-wide filter left behind)
        try:
            return int(args.run(args) or 0)
        except InternalError:
            raise
        except (CliError, FxAdaptError) as e:
            print(f"fxadapt {args.command}: error: {one_line(e)}", file=sys.stderr)
            return EXIT_USAGE

