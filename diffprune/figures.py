"""Figures as PNG: matplotlib without a display, and a figure turned into PNG bytes or an atomically written file.
matplotlib is imported on first use (it is slow to import and only the plots need it)."""
from __future__ import annotations

import io

from .util import atomic_write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_png(fig, **savefig) -> bytes:
    """The figure as PNG bytes (savefig's options, e.g. bbox_inches="tight"); the figure is closed."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **savefig)
    finally:
        pyplot().close(fig)
    return buf.getvalue()


def save_figure(fig, path, **savefig) -> None:
    """The figure written as a PNG file, atomically; the figure is closed."""
    atomic_write_bytes(path, figure_png(fig, **savefig))
