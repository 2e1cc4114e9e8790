"""fxadapt: adapt a PyTorch model's widths and depths to a compute budget, compiler-pass style.

The package folders follow the pipeline: ``ir`` (export to ATen), ``ops`` (the one op registry), ``analysis``
(groups, blocks, cost model), ``hw`` (targets, timing), ``planning`` (budgets, solver, plans, latency solve),
``search`` (supernet, DNA, FUR), ``train`` (batches, fine-tuning), ``pipeline`` (pass runner, ``transform``),
``export`` (ONNX, save/load, reports, benchmark) and ``cli``; the graph passes ship as ``fxadapt.passes``.

>>> import torch, fxadapt
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
>>> a = fxadapt.analyze(model, (torch.randn(1, 3, 16, 16),))
>>> [g.width for g in a.groups]
[8]
"""

from fxadapt import dist  # noqa: E402  (fxadapt.dist.is_main() etc.)
from fxadapt.analysis import Analysis, analyze
from fxadapt.errors import (
                            BudgetError,
                            BudgetWarning,
                            CaptureError,
                            ExportError,
                            FxAdaptError,
                            GrowthWarning,
                            InputError,
                            InternalError,
                            LoadError,
                            RecipeError,
                            ReplanWarning,
                            ResourceError,
                            SaveError,
                            SearchConfigError,
                            SearchInterrupted,
                            ShapeCheckError,
                            UncostedWarning,
                            UserCodeError,
                            WriteBackError,
                            WriteBackWarning,
)
from fxadapt.export.bench import benchmark
from fxadapt.export.modules import from_pretrained, recipe_of
from fxadapt.export.onnx import export_onnx
from fxadapt.export.program import captured_from_program, to_exported_program
from fxadapt.export.report import Report, report
from fxadapt.export.save import load, save
from fxadapt.export.stream import adapt_checkpoint
from fxadapt.hw.target import Target, TargetError  # noqa: F401  (TargetError lives in fxadapt.errors)
from fxadapt.passes.capture import capture
from fxadapt.pipeline.recovery import RecoveryConfig
from fxadapt.pipeline.transform import TransformConfig, VerificationError, transform
from fxadapt.planning.budget import Budget
from fxadapt.planning.solver import SolveConfig
from fxadapt.search.dna import SearchConfig
from fxadapt.search.fur import FurConfig
from fxadapt.search.importance import ImportanceConfig
from fxadapt.search.supernet import SupernetConfig
from fxadapt.train.finetune import FinetuneConfig, finetune
from fxadapt.writeback import Recipe, apply

__all__ = ["export_onnx", "ExportError", "transform", "TransformConfig", "report", "Report", "Budget",
           "VerificationError", "analyze", "Analysis", "capture", "CaptureError", "InputError", "BudgetError",
           "FxAdaptError", "InternalError", "UserCodeError", "ReplanWarning", "finetune", "FinetuneConfig",
           "save", "load", "to_exported_program", "captured_from_program", "Target", "TargetError",
           "benchmark", "dist", "from_pretrained", "recipe_of", "apply", "Recipe", "WriteBackWarning",
           "WriteBackError", "SolveConfig", "SearchConfig", "FurConfig", "SupernetConfig", "ImportanceConfig",
           "BudgetWarning", "LoadError", "RecipeError", "SaveError", "SearchConfigError", "SearchInterrupted",
           "ShapeCheckError", "UncostedWarning", "GrowthWarning", "adapt_checkpoint",
           "RecoveryConfig", "ResourceError"]
__version__ = "0.2.0"
