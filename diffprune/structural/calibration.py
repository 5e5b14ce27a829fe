"""The one fixed calibration batch gradient criteria are scored on.

Real training images where this project has them (Fashion-MNIST for 1x32x32 pixel models, with their labels);
a synthetic random batch only for architectures with no data here (SD latents, CIFAR-size, DiT latents), and
the report says so.
"""
from __future__ import annotations

import dataclasses

import torch

from ..data import load_fashion_mnist
from ..errors import DiffpruneError
from ..models import get_adapter

SOURCES = ("auto", "fmnist", "synthetic")


@dataclasses.dataclass
class CalibrationBatch:
    images: torch.Tensor          # (N, C, H, W) in model space: pixels in [-1, 1] or latents
    cond: dict                    # adapter conditioning for the batch (class labels, text embeddings)
    source: str                   # human-readable description
    synthetic: bool

    def describe(self) -> dict:
        return {"source": self.source, "synthetic": self.synthetic, "batch": int(self.images.shape[0]),
                "shape": list(self.images.shape[1:])}


def is_fmnist_shaped(model) -> bool:
    adapter = get_adapter(model)
    return adapter.family in ("unet2d", "dit") and tuple(adapter.sample_shape(model)) == (1, 32, 32)


def default_batch_size(model) -> int:
    """The paper's calibration sizes: 128 images at 32x32, 64 at 64x64, a few for large latent models."""
    adapter = get_adapter(model)
    if adapter.conditioning == "text":  # latent text models (SD, FLUX, SD3): a few, whatever the latent size
        return 4
    _, h, w = adapter.sample_shape(model)
    return 128 if h * w <= 32 * 32 else 64 if h * w <= 64 * 64 else 4


def calibration_batch(model, source: str = "auto", batch: int | None = None, data_dir=None,
                      seed: int = 0) -> CalibrationBatch:
    if source not in SOURCES:
        raise DiffpruneError(f"unknown calibration data {source!r}; choose one of {', '.join(SOURCES)}")
    batch = batch or default_batch_size(model)
    fmnist = is_fmnist_shaped(model)
    if source == "fmnist" and not fmnist:
        raise DiffpruneError("Fashion-MNIST calibration needs a 1x32x32 pixel model; this one takes "
                             f"{tuple(get_adapter(model).sample_shape(model))}")
    if source == "synthetic" and fmnist:
        raise DiffpruneError("this is a Fashion-MNIST-shaped model: calibrate it on real images (--data fmnist); "
                             "synthetic batches are only for architectures with no data set here")
    if fmnist:
        return fashion_mnist_batch(model, batch, data_dir, seed)
    return synthetic_batch(model, batch, seed)


def fashion_mnist_batch(model, batch: int, data_dir=None, seed: int = 0) -> CalibrationBatch:
    images, labels = load_fashion_mnist("train", directory=data_dir)
    if batch > len(images):
        raise DiffpruneError(f"calibration batch {batch} is larger than the data set ({len(images)} images)")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:batch]
    x, y = images[pick], labels[pick]
    return CalibrationBatch(images=x, cond=_class_cond(model, y), synthetic=False,
                            source=f"Fashion-MNIST train, {batch} images (seed {seed})")


def synthetic_batch(model, batch: int, seed: int = 0) -> CalibrationBatch:
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(seed)
    c, h, w = adapter.sample_shape(model)
    if adapter.family == "unet2d":  # pixels in [-1, 1]
        x = torch.rand(batch, c, h, w, generator=g) * 2 - 1
        what = "uniform random pixels in [-1, 1]"
    else:  # latents: standard normal, like scaled VAE latents
        x = torch.randn(batch, c, h, w, generator=g)
        what = "standard normal latents"
    if adapter.conditioning == "text":
        cond = adapter.example_condition(model, batch, generator=g)
        what += " with random text embeddings"
    else:
        n = _num_classes(model)
        y = torch.randint(0, n, (batch,), generator=g) if n else None
        cond = _class_cond(model, y)
        if n:
            what += " with random labels"
    return CalibrationBatch(images=x, cond=cond, synthetic=True,
                            source=f"synthetic: {batch} {what} (no data set for this architecture; seed {seed})")


def _num_classes(model) -> int:
    adapter = get_adapter(model)
    return int(adapter.num_classes(model)) if hasattr(adapter, "num_classes") else 0


def _class_cond(model, labels) -> dict:
    n = _num_classes(model)
    if not n or labels is None:
        return {}
    if int(labels.max()) >= n:
        raise DiffpruneError(f"labels go up to {int(labels.max())} but the model has {n} classes")
    return {"class_labels": labels.long()}
