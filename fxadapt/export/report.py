"""Readable tables and the ``Report`` of a transform, as the export layer hands them out: the analysis
summary and the plain-text table are ``fxadapt.analysis.summary``, the ``Report`` is
``fxadapt.pipeline.report`` (what ``transform`` attaches), all re-exported here.
"""

from fxadapt.analysis.summary import ELASTICITY_NOTE, analysis_table, human, table  # noqa: F401  (re-export)
from fxadapt.pipeline.report import GroupChange, Report, attach, report  # noqa: F401  (re-export)
