"""Evaluate a text-to-image pipeline under a schedule (or against a reference pipeline) on given prompts.

There is no image data set for text models here, so quality is consistency: SSIM/PSNR of the decoded images to
those of the dense pipeline (or of `reference`) from the same prompts and noise, next to the MACs of the rollout.
"""
from __future__ import annotations

import time

import torch

from .errors import DiffpruneError
from .evaluate import macs_summary, schedule_context
from .metrics import quality
from .sampling import default_guidance, generate, make_scheduler
from .util import denoiser_of
from .zoo import load_for_sampling


def evaluate_prompts(pipe, prompts, *, schedule=None, reference=None, num_steps: int = 50, sampler: str | None = None,
                     guidance_scale: float = 7.5, seed: int = 0, progress: bool = True) -> tuple[dict, torch.Tensor]:
    """(metrics, images): MACs per image (cascade applied) and SSIM/PSNR to the dense pipeline's images (or to
    reference's) from the same prompts and seed. sampler None: the pipeline's own scheduler."""
    if denoiser_of(pipe) is pipe:
        raise DiffpruneError("evaluate_prompts needs a text-to-image pipeline, not a bare denoiser")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sched = pipe.scheduler if sampler is None else make_scheduler(sampler, pipe.scheduler.config)
    kw = dict(num_steps=num_steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed, progress=progress)
    result = {"sampler": sampler or type(pipe.scheduler).__name__, "num_steps": num_steps,
              "n_samples": len(prompts), "guidance_scale": guidance_scale, "seed": seed}
    result.update(macs_summary(denoiser_of(pipe), num_steps=num_steps, sampler=sched, schedule=schedule))
    start = time.perf_counter()
    with schedule_context(pipe, schedule):
        images = generate(pipe, prompts, **kw, grid=schedule.grid if schedule is not None else None)
    result["ms_per_image"] = 1000 * (time.perf_counter() - start) / len(prompts)
    if schedule is not None or reference is not None:
        ref = generate(reference if reference is not None else pipe, prompts, **kw)
        if ref.shape != images.shape:
            raise DiffpruneError(f"the reference makes {tuple(ref.shape)} images, the pipeline {tuple(images.shape)}")
        result["ssim_to_reference"] = float(quality.ssim(images, ref, value_range=(0.0, 1.0)))
        p = quality.psnr(images, ref, reduction="none", value_range=(0.0, 1.0))
        result["psnr_to_reference"] = float(torch.nan_to_num(p, posinf=100.0).mean())
    return result, images


def evaluate_prompts_named(name: str, prompts, *, reference: str | None = None, schedule=None,
                           schedule_name: str | None = None, device: str, dtype: str, num_steps: int = 50,
                           sampler: str | None = None, guidance_scale: float | None = None, seed: int = 0) -> dict:
    """`diffprune eval --prompt`'s metrics of the pipeline `name` (against `reference`'s images if given), named
    for the table. guidance_scale None: the pipeline's own (default_guidance)."""
    pipe = load_for_sampling(name, device, dtype)
    if denoiser_of(pipe) is pipe:
        raise DiffpruneError(f"--prompt needs a text-to-image pipeline; {name} is a bare denoiser")
    ref = load_for_sampling(reference, device, dtype) if reference else None
    if guidance_scale is None:
        guidance_scale = default_guidance(pipe)
    metrics, _ = evaluate_prompts(pipe, prompts, schedule=schedule, reference=ref, num_steps=num_steps,
                                  sampler=sampler, guidance_scale=guidance_scale, seed=seed)
    metrics["name"] = name + (f" + {schedule_name}" if schedule_name else "")
    metrics["device"] = device
    return metrics
