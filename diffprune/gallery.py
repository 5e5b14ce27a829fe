"""Samples to look at, from any model the zoo loads: a pipeline from prompts, a class-conditional denoiser by
class (one grid row each), an unconditional one; dense or under a schedule, eager or as one captured CUDA graph;
under `accelerate launch` each process samples a share of one batch. What `diffprune sample` draws and writes."""
from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
import torch

from .capture import capture_rollout
from .data import CLASSES
from .errors import DiffpruneError
from .evaluate import schedule_context
from .images import save_grid
from .models import get_adapter
from .sampling import decode_latents, encode_prompts, generate, make_noise, sample
from .util import atomic_write_bytes, denoiser_of


@dataclasses.dataclass
class Gallery:
    images: torch.Tensor              # (N, C, H, W)
    labels: torch.Tensor | None       # class-conditional models: the class of each image
    ncol: int
    rows: list[str] | None = None     # row labels of the grid (class names)

    def save(self, png, npz=None, title: str | None = None) -> list[str]:
        """The PNG grid, and with npz the raw samples as float32 arrays (images, labels); the paths written."""
        save_grid(self.images, png, ncol=self.ncol, title=title, row_labels=self.rows)
        if not npz:
            return [str(png)]
        buf = io.BytesIO()
        np.savez(buf, images=self.images.float().cpu().numpy(),
                 labels=(self.labels.numpy() if self.labels is not None else np.zeros(0, dtype=np.int64)))
        atomic_write_bytes(npz, buf.getvalue())
        return [str(png), str(npz)]


def draw(obj, *, steps: int, sampler: str, guidance_scale: float, seed: int = 0, schedule=None,
         prompts=None, classes=None, per_class: int = 8, n: int | None = None, compile: bool = False,
         compile_units: bool = False, device="cpu", procs=None, before=None) -> Gallery:
    """Samples of `obj` (a pipeline or a denoiser). compile: the whole rollout as one CUDA graph (CUDA only);
    compile_units: its units compiled with torch.compile inside that graph (implies compile).
    procs: accelerate's process state (None: one process). before(): called once the request is known to be
    sane, just before the sampling starts (the CLI claims its outputs there)."""
    gallery = _draw(obj, steps=steps, sampler=sampler, guidance_scale=guidance_scale, seed=seed, schedule=schedule,
                    prompts=prompts, classes=classes, per_class=per_class, n=n, compile=compile or compile_units,
                    compile_units=compile_units, device=device,
                    procs=procs, before=before or (lambda: None))
    if gallery.images.shape[1] not in (1, 3):
        raise DiffpruneError("these are latents (the model is a latent denoiser); point at a pipeline "
                             "directory to decode them into images")
    return gallery


def _draw(obj, *, steps, sampler, guidance_scale, seed, schedule, prompts, classes, per_class, n, compile,
          compile_units, device, procs, before) -> Gallery:
    model = denoiser_of(obj)
    adapter = get_adapter(model)
    grid = schedule.grid if schedule is not None else None
    world = procs.num_processes if procs is not None else 1
    if compile and not str(device).startswith("cuda"):
        raise DiffpruneError("--compile captures the rollout as a CUDA graph and needs --device cuda")
    with schedule_context(obj, schedule) if not compile else contextlib.nullcontext():
        if obj is not model:  # a pipeline
            if not prompts:
                raise DiffpruneError("a pipeline needs at least one --prompt")
            if world > 1:
                raise DiffpruneError("pipelines sample in one process for now; run without accelerate launch")
            before()
            if compile:
                cond, uncond = encode_prompts(obj, prompts)
                rollout = capture_rollout(obj, schedule, steps=steps, sampler=sampler, batch=len(prompts),
                                          cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                                          compile_units=compile_units)
                with torch.no_grad():
                    images = decode_latents(obj, rollout(seed=seed))
            else:
                images = generate(obj, prompts, num_steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                                  seed=seed, grid=grid)
            return Gallery(images, None, len(prompts))
        if adapter.is_class_conditional(model):
            k = adapter.num_classes(model)
            classes = classes or list(range(k))
            bad = [c for c in classes if not 0 <= c < k]
            if bad:
                raise DiffpruneError(f"--classes {bad} out of range: the model has classes 0..{k - 1}")
            before()
            labels = torch.tensor(classes).repeat_interleave(per_class)
            if compile:
                images = capture_rollout(model, schedule, steps=steps, sampler=sampler, batch=len(labels),
                                         labels=labels.to(device), guidance_scale=guidance_scale,
                                         compile_units=compile_units)(seed=seed)
            else:
                images = _shared(model, steps, sampler, guidance_scale, seed, len(labels), labels, procs, grid,
                                 device)
            rows = [CLASSES[c] if k == len(CLASSES) else str(c) for c in classes]
            return Gallery(images, labels, per_class, rows)
        if adapter.conditioning == "text":
            raise DiffpruneError("a bare text-conditional denoiser cannot be sampled without its text encoder; "
                                 "point at the pipeline directory instead (or try the zoo's tiny-sd-pipe)")
        n = n or 16
        before()
        if compile:
            images = capture_rollout(model, schedule, steps=steps, sampler=sampler, batch=n,
                                     compile_units=compile_units)(seed=seed)
        else:
            images = _shared(model, steps, sampler, guidance_scale, seed, n, None, procs, grid, device)
        return Gallery(images, None, min(n, 8))


def _shared(model, steps, sampler, guidance_scale, seed, n, labels, procs, grid, device):
    """n samples from one seed's noise; under `accelerate launch` each process runs a contiguous share of the
    batch and all are gathered, so the grid matches a one-process run (up to batch-size rounding in the kernels)."""
    world = procs.num_processes if procs is not None else 1
    rank = procs.process_index if procs is not None else 0
    if world > 1 and sampler.lower() in ("ddpm", "lcm"):
        raise DiffpruneError(f"the {sampler} sampler draws step noise for the whole batch, so a share of it "
                             f"cannot match a one-process run; use a deterministic sampler (ddim, plms, "
                             f"dpm-solver++) with several processes, or run one")
    if n < world:
        raise DiffpruneError(f"{n} samples cannot be shared by {world} processes; ask for more")
    noise = make_noise(model, n, seed=seed)  # the whole batch's noise, as one process would draw it
    part = torch.arange(n).tensor_split(world)[rank]
    mine = sample(model, steps, sampler, noise=noise[part],
                  labels=labels[part].to(device) if labels is not None else None,
                  guidance_scale=guidance_scale, seed=seed, grid=grid, progress=rank == 0).cpu()
    if world == 1:
        return mine
    parts = [None] * world
    torch.distributed.all_gather_object(parts, mine)
    return torch.cat(parts)
