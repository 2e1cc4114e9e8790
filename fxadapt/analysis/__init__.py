"""Analysis: channel labels through the op registry, coupled groups, residual blocks, the cost model."""

from fxadapt.analysis.analyze import Analysis, analyze

__all__ = ["Analysis", "analyze"]
