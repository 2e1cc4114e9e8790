"""Every error and warning fxadapt raises, in one place; each message says what was wrong and what to do.

Errors derive from ``FxAdaptError`` (bad input ones also from ``ValueError``); warnings from ``UserWarning``.
"""


class FxAdaptError(Exception):
    """Base class of every error fxadapt raises on purpose."""


class CaptureError(FxAdaptError):
    """The model could not be lifted to an ATen-level FX graph (the message names the op or source line)."""


class InputError(FxAdaptError, ValueError):
    """Example inputs that do not fit the model (wrong type, shape or count), or an option of ``transform``
    that does not exist or takes no such value (the message names the valid ones)."""


class BudgetError(FxAdaptError, ValueError):
    """A budget that is malformed or outside the range the model can reach (the message states the range)."""


class BudgetWarning(UserWarning):
    """The widths returned miss the ``tol`` window (the groups are too coarse) but lie on the right side of
    the budget; the message says how far. ``warnings.simplefilter("error", BudgetWarning)`` or
    ``SolveConfig(strict=True)`` turns it into a refusal.

    >>> issubclass(BudgetWarning, UserWarning)
    True
    """


class RecipeError(FxAdaptError, ValueError):
    """A recipe that does not fit the model it is applied to (names or structure differ)."""


class WriteBackWarning(UserWarning):
    """The plan could not be written back into the user's modules; the verified graph is returned."""


class WriteBackError(FxAdaptError):
    """``write_back="strict"``: the plan could not be written back into the user's modules."""


class VerificationError(FxAdaptError):
    """An adapted model failed a check (runs, shapes, budget, numerics); the message says which."""


class SearchInterrupted(FxAdaptError):
    """A search stopped early on purpose (``SearchConfig.stop_after``); its checkpoint resumes it."""


class ExportError(FxAdaptError):
    """Export (ONNX or ExportedProgram), simplification, checking or the numerical comparison failed."""


class SaveError(FxAdaptError):
    """A model ``save`` cannot store as plain data, or a file ``load`` cannot read; the message says why."""


class LoadError(FxAdaptError, ValueError):
    """A saved module that cannot be restored as asked (the message says what to pass)."""


class ResourceError(FxAdaptError):
    """A step needs more memory or disk than is available: the message names the bytes needed and available
    and what to do."""


class SearchConfigError(FxAdaptError, ValueError):
    """A search configuration that would do nothing (or cannot run)."""


class TargetError(FxAdaptError, ValueError):
    """A target that does not exist or cannot run here (unknown runtime, CUDA without a GPU)."""


class ReplanWarning(UserWarning):
    """The plan was made again with two groups at one width so that the model's own code runs."""


class GrowthWarning(UserWarning):
    """Growth that is not function-preserving was asked for (``SolveConfig(preserve=False)``): the message
    names the widened groups and the measured output error against the original at the example inputs."""


class UncostedWarning(UserWarning):
    """``analyze`` found ops whose MACs the cost model does not count as torch does (budgets would be off)."""


class ShapeCheckError(FxAdaptError):
    """A rewritten graph failed to run (the message names the node)."""


class InternalError(FxAdaptError):
    """A pipeline step failed with an error fxadapt did not raise on purpose: a bug in fxadapt, not in the
    input. The message names the step and the steps before it; the original exception is chained
    (``__cause__``)."""


def warn(message: str | Warning, category: type = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside fxadapt (the user's line, at any call depth:
    a pipeline step, a many-budget call, a CLI), so filters and messages point at the user's code.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     warn("x", BudgetWarning)
    >>> w[0].category.__name__, w[0].filename.startswith("<doctest")
    ('BudgetWarning', True)
    """
    import os
    import sys
    import types
    import warnings

    here = os.path.dirname(os.path.abspath(__file__))
    roots = (here, os.path.join(os.path.dirname(here), "passes"))
    frame: types.FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(roots):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


class UserCodeError(InputError):
    """A callable the user passed (a ``loss_fn``, a dataset's ``__getitem__``, a collate function) raised
    inside a pipeline step; the message names its file and line, the original exception is chained."""

