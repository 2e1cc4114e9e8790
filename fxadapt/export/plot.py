"""Plots: per-group widths before and after adaptation (matplotlib, headless)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fxadapt.pipeline.report import Report


def plot_widths(report: Report, path: str) -> str:
    """Bar chart of every group's width, original vs adapted; returns ``path``.

    >>> import tempfile, os, torch, fxadapt
    >>> from fxadapt.examples import example_model, EXAMPLE_INPUT_SHAPE
    >>> m = fxadapt.transform(example_model(), 0.5, (torch.randn(EXAMPLE_INPUT_SHAPE),))
    >>> os.path.exists(plot_widths(fxadapt.report(m), os.path.join(tempfile.mkdtemp(), "w.png")))
    True
    """
    import matplotlib  # deferred: optional dependency, plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: optional dependency, plots only

    groups = report.groups
    xs = range(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(groups)), 4.0))
    ax.bar([x - 0.2 for x in xs], [g.before for g in groups], width=0.4, label="original")
    ax.bar([x + 0.2 for x in xs], [g.after for g in groups], width=0.4, label="adapted")
    ax.set_xlabel("channel group (network order)")
    ax.set_ylabel("width (channels)")
    ratio = report.macs_after / report.macs_before
    ax.set_title(f"fxadapt {report.strategy}: MACs x{ratio:.3f} (target "
                 f"x{report.macs_target / report.macs_before:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
