"""diffprune: structural (Diff-Pruning) and temporal (DiP-GO) pruning of diffusers models.

The public API, imported lazily so that `import diffprune` stays cheap:

    load_model(path_or_zoo_name)            a denoiser, pipeline or pruned model (nothing is downloaded)
    build_graph(model, granularity)         units, data flow, per-unit MACs (the one model description)
    sample(model, num_steps, sampler, ...)  one sampling loop for every family and scheduler
    prune(model, ratio, criterion, ...)     structural pruning; save_pruned(model, dir) to store it
    train_diffusion(model, images, ...)     training and fine-tuning (TrainConfig.finetune() = paper recipe)
    search_schedule(model, method, ...)     a block-skipping schedule (dipgo, deepcache, steps, ...)
    apply_schedule(model_or_pipe, sched)    run under a schedule (context manager; hooks removed on exit)
    capture_rollout(model, sched, ...)      a whole rollout as one CUDA graph, returned as a callable
    evaluate(model, ...)                    MACs, FD-FMNIST, class accuracy, SSIM/PSNR to a reference
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "diffprune.zoo", "build_graph": "diffprune.models", "sample": "diffprune.sampling",
    "prune": "diffprune.structural", "save_pruned": "diffprune.structural", "load_pruned": "diffprune.structural",
    "train_diffusion": "diffprune.train", "TrainConfig": "diffprune.train",
    "search_schedule": "diffprune.schedule", "apply_schedule": "diffprune.schedule", "Schedule": "diffprune.schedule",
    "evaluate": "diffprune.evaluate", "DiffpruneError": "diffprune.errors",
    "capture_rollout": "diffprune.capture",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use (__getattr__)
    from .capture import capture_rollout
    from .errors import DiffpruneError
    from .evaluate import evaluate
    from .models import build_graph
    from .sampling import sample
    from .schedule import Schedule, apply_schedule, search_schedule
    from .structural import load_pruned, prune, save_pruned
    from .train import TrainConfig, train_diffusion
    from .zoo import load_model


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffprune' has no attribute {name!r}")


def __dir__():  # the public API and the module's own dunders, not its imports
    return sorted({*(n for n in globals() if n.startswith("__")), *_EXPORTS})
