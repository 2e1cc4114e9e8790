"""Errors fxadapt raises on bad input; each message says what was wrong and what would be accepted."""


class FxAdaptError(Exception):
    """Base class of every error fxadapt raises on purpose."""


class CaptureError(FxAdaptError):
    """The model could not be lifted to an ATen-level FX graph (the message names the op or source line)."""


class InputError(FxAdaptError, ValueError):
    """Example inputs that do not fit the model (wrong type, shape or count)."""


class BudgetError(FxAdaptError, ValueError):
    """A budget that is malformed or outside the range the model can reach (the message states the range)."""
