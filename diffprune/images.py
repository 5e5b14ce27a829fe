"""Image grids for people to look at: PNG files with optional row/column labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .figures import pyplot, save_figure


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] samples (or [0, 1] decoded images, detected by a min >= 0) to [0, 1] float."""
    x = images.detach().float().cpu()
    return x.clamp(0, 1) if x.min() >= 0 else ((x + 1) / 2).clamp(0, 1)


def grid_array(images: torch.Tensor, ncol: int, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) -> one (rows*H, ncol*W, 3) uint8 array, white padding between cells."""
    x = to_unit(images)
    n, c, h, w = x.shape
    if c == 1:
        x = x.repeat(1, 3, 1, 1)
    nrow = (n + ncol - 1) // ncol
    out = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = \
            x[i].permute(1, 2, 0).numpy()
    return (out * 255).round().astype(np.uint8)


def save_grid(images: torch.Tensor, path, ncol: int = 8, title: str | None = None,
              row_labels: list[str] | None = None, scale: float = 0.6):
    """Save images as a PNG grid (atomically). With a title or row labels the grid is drawn by matplotlib."""
    plt = pyplot()
    arr = grid_array(images, ncol)
    h, w = arr.shape[:2]
    fig_w = max(3.0, w / 100 * scale * 3)
    fig_h = fig_w * h / w + (0.4 if title else 0)
    fig, ax = plt.subplots(figsize=(fig_w + (1.4 if row_labels else 0), fig_h), dpi=100)
    ax.imshow(arr, interpolation="nearest")
    ax.set_xticks([])
    if row_labels:
        nrow = len(row_labels)
        ax.set_yticks([(i + 0.5) * h / nrow for i in range(nrow)], row_labels, fontsize=9)
    else:
        ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, Path(path))
