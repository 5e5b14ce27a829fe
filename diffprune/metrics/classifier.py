"""The Fashion-MNIST feature network: a small CNN classifier the project trains and ships.

No Inception weights exist here, so "FID" for the Fashion-MNIST models is a Frechet distance in the feature space
of this classifier (named FD-FMNIST, never FID), against statistics of the real test set shipped beside it. The
same network gives the class accuracy of class-conditional samples.

Inputs everywhere: one-channel images in [-1, 1] (the range load_fashion_mnist and the samplers use), 28x28 or
32x32. 32x32 images are centre-cropped to 28x28 first: the Fashion-MNIST models work on the 28x28 images padded
with a -1 border, so the border carries no content and the classifier never sees it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DiffpruneError
from ..util import atomic_write_bytes, atomic_write_text
from .quality import feature_statistics, frechet_distance

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "zoo" / "checkpoints" / "fmnist-classifier"
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
REFERENCE_FILE = "fd_reference_test.safetensors"
FORMAT = "diffprune-fmnist-classifier"
DEFAULT_CHANNELS = (32, 64, 128, 128)


class FMNISTClassifier(nn.Module):
    """A 4x4 stride-2 stem (28 -> 14), then 3x3 conv+BN+ReLU stages with 2x2 max-pools between them (14 -> 7 -> 3),
    and a global average pool. Sized for a 2-core CPU: ~9M MACs per image, trains to >90% test accuracy in a few epochs.

    The pooled vector is the feature space of FD-FMNIST: like Inception's pool3, an average of post-ReLU maps,
    taken just before the linear classifier (the penultimate layer)."""

    def __init__(self, channels=None, num_classes: int = 10):
        super().__init__()
        self.channels = tuple(int(c) for c in (channels or DEFAULT_CHANNELS))
        self.num_classes = int(num_classes)

        def cbr(c_in, c_out, k, stride, pad):
            return [nn.Conv2d(c_in, c_out, k, stride, pad, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        layers = cbr(1, self.channels[0], 4, 2, 1)
        for i, c in enumerate(self.channels[1:]):
            if i:
                layers.append(nn.MaxPool2d(2))  # 14 -> 7 -> 3
            layers += cbr(self.channels[i], c, 3, 1, 1)
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(self.channels[-1], self.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.channels[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_prepare(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _prepare(x: torch.Tensor) -> torch.Tensor:
    """Check the shape and centre-crop 32x32 to 28x28 (see the module docstring)."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) not in ((28, 28), (32, 32)):
        raise DiffpruneError(f"the Fashion-MNIST classifier takes one-channel 28x28 or 32x32 images in [-1, 1], "
                             f"shaped (N, 1, H, W); got {tuple(x.shape)}")
    if x.shape[-1] == 32:
        x = x[..., 2:30, 2:30]
    return x.float()


# ---------------------------------------------------------------------------------------------------------------
# loading the shipped network (safetensors + JSON only)

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_config(directory: Path) -> dict:
    """classifier.json of a classifier directory, checked enough to rebuild the network from it."""
    cfg_file = directory / CONFIG_FILE
    if not cfg_file.is_file():
        raise DiffpruneError(f"{directory} holds no {CONFIG_FILE}; point at a directory written by "
                             f"scripts/train_classifier.py (the shipped one is {SHIPPED_DIR})")
    try:
        cfg = json.loads(cfg_file.read_text())
        arch = cfg["architecture"]
        channels = [int(c) for c in arch["channels"]]
        num_classes = int(arch["num_classes"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DiffpruneError(f"{cfg_file}: not a diffprune classifier description ({e}); "
                             f"retrain with scripts/train_classifier.py") from e
    if cfg.get("format") != FORMAT or not channels or num_classes < 2:
        raise DiffpruneError(f"{cfg_file}: not a diffprune classifier description (format {cfg.get('format')!r})")
    return cfg


def load_classifier(directory: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FMNISTClassifier:
    """The classifier in `directory` (default: the shipped one), in eval mode. A missing, corrupt or mismatched
    weights file raises DiffpruneError."""
    directory = Path(directory) if directory is not None else SHIPPED_DIR
    cfg = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise DiffpruneError(f"{weights} is missing; retrain with scripts/train_classifier.py")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffpruneError(f"{weights}: not a readable safetensors file ({e}); retrain with "
                             f"scripts/train_classifier.py") from e
    model = FMNISTClassifier(cfg["architecture"]["channels"], cfg["architecture"]["num_classes"])
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(state))
    problems += [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
    if problems:
        raise DiffpruneError(f"{weights} does not match the architecture in {CONFIG_FILE} "
                             f"({len(problems)} mismatches, e.g. {problems[0]}); the two files come from "
                             f"different trainings: retrain with scripts/train_classifier.py")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().to(device)


@functools.lru_cache(maxsize=1)
def _shipped() -> FMNISTClassifier:
    return load_classifier()


# ---------------------------------------------------------------------------------------------------------------
# using it

@torch.no_grad()
def _run(fn_name: str, images: torch.Tensor, model, batch_size: int, device, progress: bool) -> torch.Tensor:
    model = model if model is not None else _shipped()
    device = torch.device(device) if device is not None else images.device
    model = model.to(device).eval()
    fn = getattr(model, fn_name)
    out = []
    from tqdm.auto import tqdm
    for i in tqdm(range(0, len(images), batch_size), desc=f"classifier {fn_name}", disable=not progress,
                  leave=False):
        out.append(fn(images[i:i + batch_size].to(device)).float().cpu())
    if not out:
        raise DiffpruneError("no images given to the Fashion-MNIST classifier")
    return torch.cat(out)


def features(images: torch.Tensor, model: FMNISTClassifier | None = None, *, batch_size: int = 500,
             device=None, progress: bool = False) -> torch.Tensor:
    """Penultimate features (N, feature_dim), float32 on the CPU. model None: the shipped classifier."""
    return _run("features", images, model, batch_size, device, progress)


def logits(images: torch.Tensor, model: FMNISTClassifier | None = None, *, batch_size: int = 500,
           device=None, progress: bool = False) -> torch.Tensor:
    return _run("forward", images, model, batch_size, device, progress)


def predict(images: torch.Tensor, model: FMNISTClassifier | None = None, **kw) -> torch.Tensor:
    """Predicted class indices (N,), int64."""
    return logits(images, model, **kw).argmax(dim=1)


def accuracy(images: torch.Tensor, labels: torch.Tensor, model: FMNISTClassifier | None = None, **kw) -> float:
    """Fraction of images classified as their label: for class-conditional samples, the share that show the
    class they were asked for."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if len(labels) != len(images):
        raise DiffpruneError(f"{len(images)} images but {len(labels)} labels")
    return float((predict(images, model, **kw) == labels).double().mean())


def reference_statistics(directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma), float64, of the classifier's features on the 10,000 real test images, as shipped beside the
    classifier. Refuses statistics recorded for a different classifier file."""
    directory = Path(directory) if directory is not None else SHIPPED_DIR
    path = directory / REFERENCE_FILE
    if not path.is_file():
        raise DiffpruneError(f"{path} is missing; recompute it with scripts/train_classifier.py --stats-only")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            mu, sigma = f.get_tensor("mu").double().numpy(), f.get_tensor("sigma").double().numpy()
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise DiffpruneError(f"{path}: not a readable statistics file with mu and sigma ({e})") from e
    weights = directory / WEIGHTS_FILE
    if weights.is_file() and meta.get("classifier_sha256") not in (None, _sha256(weights)):
        raise DiffpruneError(f"{path} was computed with a different {WEIGHTS_FILE}; recompute it with "
                             f"scripts/train_classifier.py --stats-only")
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise DiffpruneError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    return mu, sigma


def fd_fmnist(images: torch.Tensor, reference=None, model: FMNISTClassifier | None = None, **kw) -> float:
    """FD-FMNIST: Frechet distance between the features of `images` and the reference (default: the shipped
    real-test-set statistics; or real images, features, or a (mu, sigma) pair).

    Like FID it is biased upward for small sample sets (600 real test images score ~0.3 against the shipped
    statistics, 5,000 vs the other 5,000 ~0.07, uniform noise ~60): compare models at equal sample counts."""
    if reference is None:
        if model is not None:
            raise DiffpruneError("a custom classifier needs its own reference: pass reference= (real images or "
                                 "a (mu, sigma) pair computed with that classifier)")
        reference = reference_statistics()
    elif torch.is_tensor(reference) and reference.dim() == 4:
        reference = features(reference, model, **kw)
    return frechet_distance(features(images, model, **kw), reference)


# ---------------------------------------------------------------------------------------------------------------
# training (scripts/train_classifier.py is the command that produced the shipped files)

def train_classifier(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 6, batch_size: int = 128,
                     lr: float = 3e-3, channels=DEFAULT_CHANNELS, seed: int = 0, eval_data=None,
                     history: list | None = None, progress: bool = True) -> FMNISTClassifier:
    """Train on (N, 1, 28|32, 28|32) images in [-1, 1]. Fixed seed; AdamW with a one-cycle learning rate;
    augmentation by random horizontal flips and +-2 pixel shifts. With eval_data=(images, labels) the accuracy on
    it is measured after every epoch; each epoch's numbers are appended to `history` when given."""
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = _prepare(images)
    labels = torch.as_tensor(labels, dtype=torch.long)
    model = FMNISTClassifier(channels)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, desc="train classifier", disable=not progress)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], gen)), labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        row = {"epoch": epoch + 1, "train_loss": round(total / len(x), 4), "seconds": round(time.time() - t0, 1)}
        if eval_data is not None:
            row["eval_accuracy"] = accuracy(eval_data[0], eval_data[1], model.eval())
        bar.write(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"))
        if history is not None:
            history.append(row)
    bar.close()
    return model.eval()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=gen))  # one shift per batch: cheap on a CPU
    return padded[..., dy:dy + 28, dx:dx + 28]


def statistics_of(images: torch.Tensor, model: FMNISTClassifier, **kw) -> tuple[np.ndarray, np.ndarray]:
    return feature_statistics(features(images, model, **kw))


def save_classifier(model: FMNISTClassifier, directory: str | os.PathLike, info: dict,
                    reference: tuple[np.ndarray, np.ndarray] | None = None, reference_meta: dict | None = None):
    """Write classifier.safetensors (fp32), classifier.json and, when given, the reference statistics into an
    existing directory (the script builds it under a temporary name, see util.output_directory)."""
    from safetensors.torch import save
    directory = Path(directory)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, save(state))
    sha = _sha256(directory / WEIGHTS_FILE)
    cfg = {"format": FORMAT, "version": 1,
           "architecture": {"channels": list(model.channels), "num_classes": model.num_classes,
                            "feature_dim": model.feature_dim,
                            "input": "(N, 1, 28|32, 28|32) in [-1, 1]; 32x32 centre-cropped to 28x28",
                            "features": "global average pool of the last conv stage (penultimate layer)"},
           "weights_sha256": sha, "dtype": "float32", **info}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
    if reference is not None:
        mu, sigma = reference
        meta = {"classifier_sha256": sha, **{k: str(v) for k, v in (reference_meta or {}).items()}}
        atomic_write_bytes(directory / REFERENCE_FILE,
                           save({"mu": torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float64)),
                                 "sigma": torch.from_numpy(np.ascontiguousarray(sigma, dtype=np.float64))},
                                metadata=meta))
