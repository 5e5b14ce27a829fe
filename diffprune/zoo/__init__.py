"""Named models: tiny test models of every family, real-size architectures with random weights (for MACs and
speed; nothing is downloaded), and the reference models this project trains and ships."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..distributed import resolve_device
from ..errors import DiffpruneError
from ..models import UnitGraph, build_graph
from ..structural.io import is_pruned, load_pruned
from ..util import denoiser_of, own_storage, read_json
from .configs import CONFIGS, random_model
from .pipelines import PIPELINES

CHECKPOINTS = Path(__file__).parent / "checkpoints"

# shipped models with no config of their own (pruned models: their widths live in the checkpoint's JSON)
SHIPPED_ONLY = {
    "fmnist-unet-dp30": "fmnist-unet pruned by Diff-Pruning (ratio 0.3, T=0.05), fine-tuned 1200 steps "
                        "(shipped; FD-FMNIST 0.86 vs dense 1.01)",
}


def names() -> list[str]:
    return sorted([*CONFIGS, *SHIPPED_ONLY, *PIPELINES])


def describe(name: str) -> str:
    if name in PIPELINES:
        return PIPELINES[name][1]
    return CONFIGS[name]["about"] if name in CONFIGS else SHIPPED_ONLY[name]


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, weights: bool = True,
          device: str | torch.device | None = None) -> torch.nn.Module:
    """Build a zoo model: the shipped checkpoint when one exists (and weights=True), else random weights.
    device: where the random weights are made; "meta" makes shapes without memory (enough for MACs and units).
    Pipeline entries (PIPELINES) build a whole diffusers pipeline."""
    if name in PIPELINES:
        pipe = PIPELINES[name][0](seed)
        return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe
    if name in SHIPPED_ONLY:
        if not weights:
            raise DiffpruneError(f"{name} exists only as a shipped checkpoint; it has no random-weight build")
        return load_model(CHECKPOINTS / name, dtype=dtype)
    if name not in CONFIGS:
        raise DiffpruneError(f"unknown model {name!r}; zoo models: {', '.join(names())}, or a local directory")
    ckpt = CHECKPOINTS / name
    if weights and (ckpt / "config.json").exists():
        return load_model(ckpt, dtype=dtype)
    return random_model(name, seed=seed, dtype=dtype, device=device)


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Load a zoo name or a local directory: a diffusers model, a diffusers pipeline, or a diffprune pruned
    model. Nothing is ever downloaded."""
    p = Path(path)
    if not p.exists():
        if str(path) in names():
            return build(str(path), dtype=dtype or torch.float32)
        raise DiffpruneError(f"{path}: no such directory, and not a zoo model ({', '.join(names())})")
    if not p.is_dir():
        raise DiffpruneError(f"{path} is a file; point at a diffusers model or pipeline directory")
    import diffusers
    if is_pruned(p):  # a pruned model: rebuilt module + safetensors
        return load_pruned(p, dtype=dtype)
    if (p / "model_index.json").exists():
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(p, local_files_only=True,
                                                               **_dtype_kwarg(dtype))
        except Exception as e:  # diffusers raises many kinds; the user needs to know which dir failed
            raise DiffpruneError(f"{path}: could not load the diffusers pipeline: {e}") from e
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module):
                own_storage(part)
        return pipe
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise DiffpruneError(
            f"{path} is not a diffusers model or pipeline directory (no config.json or model_index.json)")
    try:
        cls_name = read_json(cfg_file)["_class_name"]
    except (KeyError, TypeError, DiffpruneError) as e:
        raise DiffpruneError(f"{cfg_file}: not a diffusers config ({e})") from None
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None:
        raise DiffpruneError(f"{cfg_file}: unknown diffusers class {cls_name!r}")
    try:
        model = cls.from_pretrained(p, local_files_only=True, **_dtype_kwarg(dtype))
    except Exception as e:
        raise DiffpruneError(f"{path}: could not load the {cls_name} weights: {e}") from e
    return own_storage(model).eval()


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_for_sampling(name: str, device: str, dtype: str):
    """The model (or pipeline) on the asked device and precision (DTYPES' names), in eval mode."""
    device = resolve_device(device)
    obj = load_model(name, dtype=DTYPES[dtype])
    obj = obj.to(device)
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    return obj


def unit_graph(name: str, granularity: str = "coarse", *, batch: int = 1, height: int | None = None,
               width: int | None = None, include_attention: bool = False) -> tuple[torch.nn.Module, UnitGraph]:
    """(denoiser, its unit graph) of a zoo name or model directory, as `diffprune info` shows it. A zoo config is
    built on the meta device: shapes are all a graph needs, and that builds even FLUX's 12B parameters without
    memory."""
    if name in CONFIGS and not os.path.exists(name):
        model = build(name, weights=False, device="meta")
    else:
        model = denoiser_of(load_model(name))
    return model, build_graph(model, granularity, batch=batch, height=height, width=width,
                              include_attention=include_attention)


def _dtype_kwarg(dtype) -> dict:
    """from_pretrained's precision argument: `dtype` where diffusers takes it (newer versions warn on every load
    about `torch_dtype`), `torch_dtype` on the older versions that know only that."""
    from diffusers.utils import deprecation_utils
    key = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    return {key: dtype or torch.float32}
