"""fxadapt: adapt a PyTorch model's widths and depths to a compute budget, compiler-pass style.

>>> import torch, fxadapt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
>>> a = fxadapt.analyze(model, (torch.randn(1, 3, 16, 16),))
>>> [g.width for g in a.groups]
[8]
"""

from fxadapt.analysis import Analysis, analyze
from fxadapt.budget import Budget
from fxadapt.capture import capture
from fxadapt.errors import BudgetError, CaptureError, FxAdaptError, InputError
from fxadapt.export import ExportError, export_onnx
from fxadapt.report import Report, report
from fxadapt.transform import VerificationError, transform

__all__ = ["export_onnx", "ExportError", "transform", "report", "Report", "Budget", "VerificationError", "analyze", "Analysis", "capture", "CaptureError", "InputError", "BudgetError", "FxAdaptError"]
__version__ = "0.1.0"
