"""Evaluate a model (optionally under a schedule) the same way for every method: MACs, quality, consistency.

Quality for the Fashion-MNIST models is FD-FMNIST and class accuracy from the shipped classifier; consistency is
SSIM/PSNR to a reference model's samples from the same noise and labels (the Diff-Pruning paper's "SSIM to
dense"). Samples are drawn in batches with seed + batch index, so any two evaluations with the same seed, sample
count and batch size start from identical noise.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import processes
from .errors import DiffpruneError
from .latency import estimate_seconds, macs_summary as rollout_macs
from .metrics import classifier, quality
from .models import build_graph, count_params, get_adapter
from .sampling import default_guidance, make_noise, rollout_length, sample
from .schedule import apply_schedule
from .tables import format_table  # noqa: F401  (its old home: scripts import it from here)
from .util import denoiser_of, duration, positive_int
from .zoo import load_for_sampling


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often."""
    return torch.arange(n) % num_classes


def schedule_context(model, schedule):
    """apply_schedule(model, schedule), lenient, or nothing when schedule is None."""
    if schedule is None:
        return contextlib.nullcontext()
    return apply_schedule(model, schedule, strict=False)


def generate_set(model, n: int, *, num_steps: int = 50, sampler: str = "ddim", guidance_scale: float = 1.0,
                 seed: int = 0, batch_size: int = 250, schedule=None, labels: torch.Tensor | None = None,
                 progress: bool = True, desc: str = "sampling") -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """n samples (float32, CPU) and their labels (class-conditional models: balanced classes), plus the wall time
    in seconds. Batch b starts from make_noise(seed + b).

    Under `accelerate launch` (or torchrun) the batches are dealt out to the processes (batch b to process
    b mod world) and gathered, so every process returns the same samples a single process would make."""
    positive_int(n, "number of samples")
    positive_int(batch_size, "batch size")
    adapter = get_adapter(model)
    conditional = adapter.is_class_conditional(model)
    if adapter.conditioning == "text":
        raise DiffpruneError("evaluating text-to-image models needs prompts; use the pipeline API "
                             "(sampling.generate) with a CLIP score, see README")
    if conditional and labels is None:
        labels = balanced_labels(n, adapter.num_classes(model))
    if schedule is not None:
        schedule.check(sampler=sampler, num_steps=num_steps)
    grid = schedule.grid if schedule is not None else None
    procs = processes(next(model.parameters()).device)
    starts = list(range(0, n, batch_size))
    mine = [b for b in range(len(starts)) if b % procs.num_processes == procs.process_index]
    out = {}
    start = time.perf_counter()
    with schedule_context(model, schedule):
        for b in tqdm(mine, desc=desc, disable=not (progress and procs.is_main_process), leave=False):
            i = starts[b]
            m = min(batch_size, n - i)
            noise = make_noise(model, m, seed=seed + b)
            lab = labels[i:i + m].to(noise.device) if labels is not None else None
            out[b] = sample(model, num_steps, sampler, labels=lab, noise=noise, guidance_scale=guidance_scale,
                            seed=seed + b, grid=grid).cpu()
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if procs.num_processes > 1:  # every process gets every batch: metrics then agree without another exchange
        parts = [None] * procs.num_processes
        torch.distributed.all_gather_object(parts, out)
        out = {b: t for part in parts for b, t in part.items()}
    return torch.cat([out[b] for b in range(len(starts))]), labels, seconds


def macs_summary(model, *, num_steps: int, sampler: str, schedule=None, guidance_scale: float = 1.0) -> dict:
    """MACs per image for a rollout (batch 1, CFG doubling not counted, as the papers report), cascade applied:
    macs_* in torch-pruning's convention (the papers'), run_macs_* with the attention products counted (the FLOPs
    that run, what speed follows). Counted by latency.macs_summary (the one count); these are eval's keys for it."""
    granularity = schedule.granularity if schedule is not None else "coarse"
    graph = build_graph(model, granularity)
    run_graph = build_graph(model, granularity, include_attention=True)
    calls = rollout_length(sampler, num_steps)
    if schedule is not None:
        schedule.check(graph, sampler=sampler if isinstance(sampler, str) else None, num_steps=num_steps)
    m = rollout_macs(graph, schedule, calls, run_graph=run_graph)
    return {"macs_per_call_dense": graph.total_macs, "calls": calls,
            "denoiser_calls": schedule.n_calls if schedule is not None else calls,
            "macs_total": int(m["schedule_macs"]), "macs_ratio": m["schedule_macs"] / m["dense_macs"],
            "run_macs_total": int(m["schedule_run_macs"]),
            "run_macs_ratio": m["schedule_run_macs"] / m["dense_run_macs"], "params": count_params(model)}


def evaluate(model, *, schedule=None, reference_model=None, reference_images: torch.Tensor | None = None,
             num_steps: int = 50, sampler: str = "ddim", n_samples: int = 1000, guidance_scale: float = 2.0,
             seed: int = 0, batch_size: int = 250, fmnist_metrics: bool | None = None, progress: bool = True) -> dict:
    """Metrics of `model` (under `schedule` if given).

    Consistency (SSIM/PSNR from the same noise and labels) is measured against reference_images if given, else
    against reference_model's samples, else, when a schedule is given, against the same model without it.
    fmnist_metrics: FD-FMNIST and class accuracy (default: on for 1-channel 32x32 models).
    Returns (metrics dict, the samples as a float32 CPU tensor)."""
    result = {"sampler": sampler, "num_steps": num_steps, "n_samples": n_samples, "guidance_scale": guidance_scale,
              "seed": seed, "batch_size": batch_size}
    result.update(macs_summary(model, num_steps=num_steps, sampler=sampler, schedule=schedule))
    images, labels, seconds = generate_set(model, n_samples, num_steps=num_steps, sampler=sampler,
                                           guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                                           schedule=schedule, progress=progress)
    result["seconds"] = seconds
    result["ms_per_image"] = 1000 * seconds / n_samples
    if fmnist_metrics is None:
        fmnist_metrics = tuple(images.shape[1:]) == (1, 32, 32)
    if fmnist_metrics:
        result["fd_fmnist"] = classifier.fd_fmnist(images)
        if labels is not None:
            result["class_accuracy"] = classifier.accuracy(images, labels)
    if reference_images is None and (reference_model is not None or schedule is not None):
        ref = reference_model if reference_model is not None else model
        reference_images, _, _ = generate_set(ref, n_samples, num_steps=num_steps, sampler=sampler,
                                              guidance_scale=guidance_scale, seed=seed, batch_size=batch_size,
                                              labels=labels, progress=progress, desc="reference")
    if reference_images is not None:
        if reference_images.shape != images.shape:
            raise DiffpruneError(f"reference images {tuple(reference_images.shape)} do not match the samples "
                                 f"{tuple(images.shape)}")
        result["ssim_to_reference"] = float(quality.ssim(images, reference_images))
        p = quality.psnr(images, reference_images, reduction="none")
        result["psnr_to_reference"] = float(torch.nan_to_num(p, posinf=100.0).mean())
    return result, images


def evaluate_named(name: str, *, reference: str | None = None, schedule=None, schedule_name: str | None = None,
                   device: str, dtype: str, n_samples: int, num_steps: int, sampler: str,
                   guidance_scale: float | None = None, seed: int = 0, batch_size: int = 250, say=None) -> dict:
    """`diffprune eval`'s metrics of the model `name` (zoo name or directory; under `schedule` if given, against
    `reference`'s samples if given): evaluate's, named for the table (model + schedule), with the device and the
    number of processes the samples were split over. guidance_scale None: the model's own (default_guidance).
    say(text): where the expected time of a CPU run is said, before it starts."""
    model = denoiser_of(load_for_sampling(name, device, dtype))
    ref = denoiser_of(load_for_sampling(reference, device, dtype)) if reference else None
    if guidance_scale is None:
        guidance_scale = default_guidance(model)
    if device == "cpu" and say is not None:
        rollouts = n_samples * (2 if ref is not None or schedule is not None else 1)
        calls = rollout_length(sampler, num_steps) * -(-rollouts // min(batch_size, n_samples))
        sec = estimate_seconds(model, calls=calls, batch=min(batch_size, n_samples), guided=guidance_scale > 1)
        say(f"about {duration(sec)} for {rollouts} rollouts of {num_steps} steps (from timed dense calls; a schedule "
            f"runs faster)")
    metrics, _ = evaluate(model, schedule=schedule, reference_model=ref, num_steps=num_steps, sampler=sampler,
                          n_samples=n_samples, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)
    metrics["name"] = name + (f" + {schedule_name}" if schedule_name else "")
    metrics["device"] = device
    metrics["processes"] = processes(device).num_processes  # the samples were split over them
    return metrics


METRIC_COLUMNS = [("name", "model", ""), ("run_macs_ratio", "FLOPs run ratio", ".3f"),
                  ("macs_ratio", "MACs ratio (tp conv.)", ".3f"),
                  ("fd_fmnist", "FD-FMNIST", ".2f"), ("class_accuracy", "class acc", ".3f"),
                  ("ssim_to_reference", "SSIM to ref", ".4f"), ("psnr_to_reference", "PSNR to ref", ".2f"),
                  ("ms_per_image", "ms/image", ".2f")]
