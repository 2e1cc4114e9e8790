"""``CliError``: a usage problem the command line reports in one line (exit status 2), without a traceback.

Its own module so every subcommand helper (``common``, ``hf``) can raise it without importing the others.

>>> str(CliError("no model"))
'no model'
"""


class CliError(Exception):
    """A usage problem the command line reports in one line (exit status 2), without a traceback."""
