"""Fashion-MNIST from its IDX files (Debian package dataset-fashion-mnist, or any directory holding them)."""
from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffpruneError

DEFAULT_DIR = Path(os.environ.get("DIFFPRUNE_FMNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path) -> np.ndarray:
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)  # .xz: smaller to carry to a GPU machine
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DiffpruneError(f"{path}: cannot read IDX file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DiffpruneError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DiffpruneError(f"{path}: truncated IDX file ({body.size} values, header says {int(np.prod(dims))})")
    return body.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem + ".xz", stem):
        if (directory / name).exists():
            return directory / name
    raise DiffpruneError(
        f"Fashion-MNIST not found: {directory / (stem + '.gz')} is missing. Install it with "
        f"'apt-get install dataset-fashion-mnist' (as root), or pass a directory holding the four IDX files.")


def load_fashion_mnist(split: str = "train", directory: str | os.PathLike | None = None, pad_to: int = 32,
                       limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, pad_to, pad_to) in [-1, 1] (28x28 zero-padded, i.e. -1 borders) and int64 labels."""
    if split not in _FILES:
        raise DiffpruneError(f"unknown split {split!r}; use 'train' or 'test'")
    directory = Path(directory) if directory is not None else DEFAULT_DIR
    if not directory.is_dir():
        raise DiffpruneError(
            f"Fashion-MNIST directory {directory} does not exist. Install the data with "
            f"'apt-get install dataset-fashion-mnist' (as root), or pass --data DIR with the four IDX files.")
    img_stem, lab_stem = _FILES[split]
    images = _read_idx(_find(directory, img_stem))
    labels = _read_idx(_find(directory, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DiffpruneError(f"{directory}: images {images.shape} and labels {labels.shape} do not match")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    pad = pad_to - x.shape[-1]
    if pad < 0:
        raise DiffpruneError(f"pad_to={pad_to} is smaller than the 28x28 images")
    if pad:
        x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    return x, torch.from_numpy(labels.astype(np.int64))
