"""``python -m fxadapt``: the command line of ``fxadapt.cli``."""

from fxadapt.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
