"""ExportedProgram in and out (``fxadapt.pipeline.program``, where the transform that uses it lives)."""

from fxadapt.pipeline.program import (  # noqa: F401  (re-export)
    captured_from_program,
    from_exported_program,
    to_exported_program,
)
