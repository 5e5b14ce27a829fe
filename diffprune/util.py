"""Small helpers shared by the library and the CLI."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DiffpruneError


def denoiser_of(obj):
    """The denoiser inside a diffusers pipeline (unet or transformer), or the object itself."""
    for attr in ("unet", "transformer"):
        m = getattr(obj, attr, None)
        if m is not None and hasattr(obj, "scheduler"):
            return m
    return obj


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DiffpruneError(f"{name} must be a positive integer, got {value!r}")
    return value


def ratio(value: float, name: str = "--ratio") -> float:
    if not (0.0 < float(value) < 1.0):
        raise DiffpruneError(f"{name} must lie strictly between 0 and 1, got {value}")
    return float(value)


def atomic_write_bytes(path: str | os.PathLike, data: bytes):
    """Write a file so that readers see the old content or the new, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def output_directory(path: str | os.PathLike, overwrite: bool = False):
    """Build a result directory under a temporary name and move it into place only when complete, so an
    error or Ctrl-C never leaves a half-written directory. Refuses to replace an existing one unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DiffpruneError(f"{path} already exists; choose another output path or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def own_storage(module):
    """Copy every parameter and buffer into freshly allocated memory.

    safetensors memory-maps the file, and tensors at unaligned offsets take different SIMD code paths, so a
    loaded model can differ from the saved one in the last bit. A copy makes reloads bit-identical."""
    import torch
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
        for name, b in list(module.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            mod._buffers[leaf] = b.clone()
    return module
