"""What a run leaves to look at: loss.csv (step, loss, lr, seconds), loss.png and sample grids."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import torch

from ..figures import pyplot, save_figure
from ..models import get_adapter
from ..sampling import sample
from ..util import atomic_write_bytes, atomic_write_text
from .config import TrainConfig

_LOG_HEADER = ["step", "loss", "lr", "seconds"]


def truncate(path: Path, step: int):
    """Keep the rows up to the checkpoint being resumed from (rows after it are about to be redone)."""
    rows = []
    if path.exists() and step > 0:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= step]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([_LOG_HEADER] + rows)
    atomic_write_text(path, buf.getvalue())


def append(path: Path, step, loss, lr, seconds):
    with open(path, "a") as f:
        f.write(f"{step},{loss:.6g},{lr:.6g},{seconds:.1f}\n")


def read_loss_log(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                 "seconds": float(r["seconds"])} for r in csv.DictReader(f)]


def plot(csv_path: Path, png_path: Path):
    rows = read_loss_log(csv_path)
    if not rows:
        return
    fig, ax = pyplot().subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, marker="." if len(rows) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"training loss ({png_path.parent.name})")
    fig.tight_layout()
    save_figure(fig, png_path)


def write_samples(model, path: Path, config: TrainConfig, per_class: int = 10):
    """A grid of samples (rows: classes, for class-conditional models) with DDIM and classifier-free guidance,
    through diffprune.sampling.sample. Only for 1- or 3-channel (pixel) models."""
    c = model.config.in_channels
    if c not in (1, 3):
        return
    adapter = get_adapter(model)
    was_training = model.training
    model.eval()
    class_cond = adapter.is_class_conditional(model)
    if class_cond:
        n_cls = min(adapter.num_classes(model), 10)
        labels = torch.arange(n_cls).repeat_interleave(per_class)
        x = sample(model, config.grid_steps, "ddim", labels=labels, guidance_scale=config.grid_guidance,
                   seed=config.seed)
        rows = n_cls
    else:
        x = sample(model, config.grid_steps, "ddim", batch=per_class * per_class, seed=config.seed)
        rows = per_class
    model.train(was_training)
    write_image_grid(x, path, rows)


def write_image_grid(x: torch.Tensor, path, rows: int):
    """Save images (B, C, H, W) in [-1, 1] as one PNG grid of `rows` rows (atomically)."""
    from PIL import Image
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, c, h, w = x.shape
    cols = math.ceil(b / rows)
    pad = torch.zeros(rows * cols - b, c, h, w, dtype=torch.uint8)
    g = torch.cat([x, pad]).view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    img = Image.fromarray(g.squeeze(-1).numpy() if c == 1 else g.numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())

