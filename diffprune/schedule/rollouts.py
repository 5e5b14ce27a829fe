"""What schedule search and pruner training need from a rollout: a sampler, conditions, noise, final images and
their similarity to the dense rollout. Everything goes through sampling.sample on the bare denoiser (a pipeline
contributes its scheduler config, text encoder and VAE)."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from .. import sampling
from ..errors import DiffpruneError
from ..metrics.quality import ssim
from ..models import get_adapter
from ..util import denoiser_of


@dataclasses.dataclass
class Rollouts:
    model: torch.nn.Module                   # the bare denoiser
    pipeline: object | None
    scheduler: object                        # a configured diffusers scheduler (sample() copies it)
    sampler: str
    num_steps: int
    n_calls: int
    guidance_scale: float
    conditions: Callable                     # (rng, batch) -> sample() kwargs

    def noise(self, batch: int, seed: int) -> torch.Tensor:
        return sampling.make_noise(self.model, batch, seed=seed)

    def run(self, noise, cond: dict, *, differentiable: bool = False, checkpoint: bool = True,
            grid=None) -> torch.Tensor:
        """Final images of one rollout (on `grid`, a grid.Grid, if given): decoded by the VAE for a latent
        pipeline, else the sampler's output."""
        final = sampling.sample(self.model, self.num_steps, scheduler=self.scheduler, noise=noise,
                                guidance_scale=self.guidance_scale, differentiable=differentiable,
                                checkpoint=checkpoint, grid=grid, **cond)
        if self.pipeline is not None and getattr(self.pipeline, "vae", None) is not None:
            with torch.set_grad_enabled(differentiable):
                return sampling.decode_latents(self.pipeline, final)
        return final

    def value_range(self, reference: torch.Tensor, extent: Callable | None = None) -> tuple[float, float]:
        """Pixel range SSIM reads the images in: [-1, 1] for pixel models, [0, 1] for decoded images; bare latent
        models have no image, so their latents are compared over the reference's own range (extent(reference) ->
        (min, max): over the whole batch when this is one process's share of it)."""
        if self.pipeline is not None and getattr(self.pipeline, "vae", None) is not None:
            return (0.0, 1.0)
        if self.model.config.in_channels in (1, 3):
            return (-1.0, 1.0)
        lo, hi = extent(reference) if extent is not None else (float(reference.min()), float(reference.max()))
        return (lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))

    def similarity(self, images: torch.Tensor, reference: torch.Tensor, reduction="mean",
                   extent: Callable | None = None) -> torch.Tensor:
        return ssim(images, reference, value_range=self.value_range(reference, extent), reduction=reduction)


def make_rollouts(model_or_pipeline, *, sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 1.0,
                  labels=None, prompts=None, conditions: Callable | None = None) -> Rollouts:
    """labels: the class labels to draw from (class models; default: every class); prompts: texts to draw from
    (a Stable Diffusion pipeline); conditions: your own (rng, batch) -> sample() kwargs."""
    model = denoiser_of(model_or_pipeline)
    pipe = model_or_pipeline if model is not model_or_pipeline else None
    adapter = get_adapter(model)
    scheduler = scheduler_for(model_or_pipeline, sampler)
    n_calls = sampling.rollout_length(scheduler, num_steps)
    if conditions is None:
        conditions = _default_conditions(adapter, model, pipe, labels, prompts, guidance_scale)
    return Rollouts(model=model, pipeline=pipe, scheduler=scheduler, sampler=sampler, num_steps=num_steps,
                    n_calls=n_calls, guidance_scale=float(guidance_scale), conditions=conditions)


def scheduler_for(model_or_pipeline, sampler: str):
    """A fresh scheduler for `sampler`: a pipeline's betas and spacing, else the DDPM training schedule."""
    pipe = model_or_pipeline if denoiser_of(model_or_pipeline) is not model_or_pipeline else None
    return sampling.make_scheduler(sampler, dict(pipe.scheduler.config) if pipe is not None else None)


def timestep_grid(model_or_pipeline, sampler: str, num_steps: int) -> list:
    """The timesteps of a rollout, for people reading a schedule file (rows are keyed by call index)."""
    sched = scheduler_for(model_or_pipeline, sampler)
    sched.set_timesteps(num_steps)
    return [float(t) if sched.timesteps.is_floating_point() else int(t) for t in sched.timesteps]


def _default_conditions(adapter, model, pipe, labels, prompts, guidance_scale):
    if prompts is not None:
        if pipe is None:
            raise DiffpruneError("prompts need a pipeline with a text encoder; load the pipeline directory")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise DiffpruneError("the prompt list is empty")

        def from_prompts(rng, batch):
            pick = [prompts[i] for i in rng.integers(0, len(prompts), batch)]
            with torch.no_grad():
                cond, uncond = sampling.encode_prompts(pipe, pick)
            return {"cond": cond, "uncond": uncond}
        return from_prompts
    if adapter.is_class_conditional(model):
        pool = torch.arange(adapter.num_classes(model)) if labels is None else torch.as_tensor(labels).flatten()
        if pool.numel() == 0:
            raise DiffpruneError("the label list is empty")

        def from_labels(rng, batch):
            return {"labels": pool[torch.as_tensor(rng.integers(0, len(pool), batch))]}
        return from_labels
    if adapter.conditioning == "text":
        # a bare text denoiser has no text encoder: random embeddings exercise the code, nothing more
        def random_text(rng, batch):
            g = torch.Generator().manual_seed(int(rng.integers(0, 2 ** 31)))
            cond = adapter.example_condition(model, batch, generator=g)
            uncond = adapter.example_condition(model, batch, generator=g)
            return {"cond": cond, "uncond": uncond if guidance_scale > 1 else None}
        return random_text
    return lambda rng, batch: {"batch": batch}


def batch_share(cond: dict, batch: int, share: slice) -> dict:
    """The samples `share` of a batch's sample() kwargs: every tensor along a first axis of `batch` is cut (nested
    dicts too), the "batch" count follows; anything else (a broadcast tensor, None) is left as it is."""
    def cut(v):
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == batch:
            return v[share]
        return v
    out = cut(cond)
    if out.get("batch") == batch:
        out["batch"] = len(range(batch)[share])
    return out


def seeded_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
