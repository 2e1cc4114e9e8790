"""Plots: per-group widths before and after adaptation (matplotlib, headless)."""

from __future__ import annotations


def plot_widths(report, path: str) -> str:
    """Bar chart of every group's width, original vs adapted; returns ``path``.

    >>> import tempfile, os, torch, fxadapt
    >>> from fxadapt.examples import example_model, EXAMPLE_INPUT_SHAPE
    >>> m = fxadapt.transform(example_model(), 0.5, (torch.randn(EXAMPLE_INPUT_SHAPE),))
    >>> os.path.exists(plot_widths(fxadapt.report(m), os.path.join(tempfile.mkdtemp(), "w.png")))
    True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report.groups
    xs = range(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(groups)), 4.0))
    ax.bar([x - 0.2 for x in xs], [g.before for g in groups], width=0.4, label="original")
    ax.bar([x + 0.2 for x in xs], [g.after for g in groups], width=0.4, label="adapted")
    ax.set_xlabel("channel group (network order)")
    ax.set_ylabel("width (channels)")
    ratio = report.macs_after / report.macs_before
    ax.set_title(f"fxadapt {report.strategy}: MACs x{ratio:.3f} (target x{report.macs_target / report.macs_before:.3f})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
