"""DDPM training and fine-tuning of pixel-space denoisers: epsilon-prediction MSE, label dropout for
classifier-free guidance, EMA, optional distillation from a dense teacher, resumable checkpoints.

Used to train the Fashion-MNIST reference models from scratch and (by the structural-pruning piece) to fine-tune
pruned models with the Diff-Pruning recipe (TrainConfig.finetune()).

The noise schedule has one source of truth: diffprune.sampling.make_scheduler("ddpm") (1000 steps, linear betas
1e-4..0.02), the same schedule the samplers use; training reads its alphas_cumprod and noises
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps itself, on the device, as DDPMScheduler.add_noise does.

Checkpoints (out_dir/checkpoint/step-XXXXXXXX/) hold only safetensors and JSON: model, EMA and optimizer tensors,
the step, the data position, and every RNG state (python, numpy, torch CPU/CUDA, the training generators) of every
process, so that an interrupted run resumes exactly where it stopped. Each checkpoint is built under a temporary
name, renamed into place, and only then named in out_dir/checkpoint/latest: an interrupt never corrupts the last
good one.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .distributed import local_share
from .errors import DiffpruneError
from .models import get_adapter
from .sampling import make_scheduler, sample
from .util import atomic_write_bytes, atomic_write_text, output_directory, read_json

NUM_TRAIN_TIMESTEPS = 1000
_FORMAT = 1  # checkpoint format version


class TrainingInterrupted(DiffpruneError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; running the same command resumes it."""


# ----- configuration ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. `batch_size` is the global batch (split over processes)."""
    steps: int = 12000
    batch_size: int = 256
    lr: float = 3e-4
    warmup: int = 0                     # linear lr warm-up steps (0 = none)
    optimizer: str = "adamw"            # "adamw" | "adam"
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max global grad norm; 0 = no clipping
    ema_decay: float | None = 0.999    # None: max(0, min(0.9999, 1 - 10 / steps)), set by validate()
    ema_warmup: bool = True             # decay min(ema_decay, (1+k)/(10+k)); False = fixed decay from step 1
    label_dropout: float = 0.1          # probability of replacing a label by the null class (CFG)
    antithetic: bool = True             # timesteps t and 999-t in pairs
    loss_reduction: str = "mean"        # "mean": per-pixel MSE; "sum": summed over pixels, mean over the batch
    distill_weight: float = 0.7         # with a teacher: w*|s-teacher|^2 + (1-w)*|s-eps|^2
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 10.0    # also checkpoint after this much training time since the last one
    log_every: int = 50
    sample_every: int = 0               # sample grid every N steps (0 = only at the end)
    seed: int = 0
    mixed_precision: str = "bf16"       # "bf16" | "no"; bf16 autocast only on CUDA
    device: str = "auto"                # "auto" | "cpu" | "cuda" (under `accelerate launch`, accelerate decides)
    max_minutes: float | None = None    # stop cleanly (checkpoint + model snapshot) after this much wall time
    stop_at: int | None = None          # stop as if interrupted after this step (train in slices)
    grid: bool = True                   # write a sample grid PNG with the final model
    plot: bool = True                   # write the loss-curve PNG
    grid_steps: int = 50                # DDIM steps of the grid
    grid_guidance: float = 2.0
    meta: dict = dataclasses.field(default_factory=dict)   # free-form, saved in train_config.json

    # fields that may change between an interrupted run and its resumption; all others must match
    RUN_CONTROL = ("steps", "checkpoint_every", "checkpoint_minutes", "log_every", "sample_every", "device",
                   "max_minutes", "stop_at", "grid", "grid_steps", "grid_guidance", "plot", "meta")

    @classmethod
    def reference(cls, family: str = "unet2d", **overrides) -> "TrainConfig":
        """From-scratch recipe of the Fashion-MNIST reference models (~8 min on one H100 at batch 256).
        AdamW with linear warm-up (transformers need it), EMA 0.999 with the usual (1+k)/(10+k) warm-up:
        a ~1K-step average suits runs of 5-15K steps."""
        base = dict(steps=12000, batch_size=256, optimizer="adamw", weight_decay=0.01, grad_clip=1.0,
                    ema_decay=0.999, ema_warmup=True, label_dropout=0.1, antithetic=True, loss_reduction="mean")
        if family == "dit":
            base.update(lr=3e-4, warmup=500)
        else:
            base.update(lr=5e-4, warmup=250)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def finetune(cls, **overrides) -> "TrainConfig":
        """Diff-Pruning's fine-tuning recipe: Adam (0.9, 0.999, eps 1e-8, wd 0), constant lr 2e-4, no warm-up,
        grad-clip 1.0, EMA from step 1, antithetic timesteps, MSE summed over pixels (batch mean).

        The paper's EMA decay 0.9999 belongs to its 100K-step fine-tune: an average over the last ~10K steps, a
        tenth of the run. Kept fixed on a short run it would leave the EMA model mostly the un-fine-tuned pruned
        weights (0.9999 ** 1200 = 0.89 after 1200 steps), so unless ema_decay is given, the decay keeps that
        horizon at a tenth of the run: min(0.9999, 1 - 10 / steps), fixed when the config is validated."""
        base = dict(batch_size=128, lr=2e-4, warmup=0, optimizer="adam", betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, grad_clip=1.0, ema_decay=None, ema_warmup=False, antithetic=True,
                    loss_reduction="sum")
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DiffpruneError(f"unknown training settings {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def validate(self) -> "TrainConfig":
        def pos_int(name, allow_zero=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
                kind = "a non-negative" if allow_zero else "a positive"
                raise DiffpruneError(f"{_flag(name)} must be {kind} integer, got {v!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "grid_steps"):
            pos_int(name)
        for name in ("warmup", "sample_every", "seed"):
            pos_int(name, allow_zero=True)
        pos_int("stop_at", allow_none=True)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DiffpruneError(f"--lr must be a positive number, got {self.lr}")
        if self.ema_decay is None:  # the fine-tune recipe's default: an average over the last tenth of the run
            self.ema_decay = max(0.0, min(0.9999, 1 - 10 / self.steps))
        if not 0.0 <= self.ema_decay < 1.0:
            raise DiffpruneError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise DiffpruneError(f"--label-dropout must lie in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise DiffpruneError(f"--distill-weight must lie in [0, 1], got {self.distill_weight}")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise DiffpruneError("grad_clip and weight_decay must be >= 0 and eps > 0")
        if not (isinstance(self.checkpoint_minutes, (int, float)) and self.checkpoint_minutes > 0):
            raise DiffpruneError(f"--checkpoint-minutes must be a positive number, got {self.checkpoint_minutes!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise DiffpruneError(f"--max-minutes must be a positive number, got {self.max_minutes}")
        if self.grid_guidance < 1.0:
            raise DiffpruneError(f"grid_guidance must be >= 1, got {self.grid_guidance}")
        for name, allowed in (("optimizer", ("adamw", "adam")), ("loss_reduction", ("mean", "sum")),
                              ("mixed_precision", ("bf16", "no")), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in allowed:
                raise DiffpruneError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        return self

    def recipe_differences(self, other: "TrainConfig") -> list[str]:
        """Settings (outside RUN_CONTROL) on which two configs disagree."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if k not in self.RUN_CONTROL and a[k] != b[k]]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----- the pieces of one training step (public: tested, and reusable) ------------------------------------------

def alphas_cumprod() -> torch.Tensor:
    """alphas_cumprod (float32, 1000) of the DDPM training schedule, from the same scheduler the samplers use."""
    return make_scheduler("ddpm").alphas_cumprod.to(torch.float32).clone()


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * eps (acp on x0's device)."""
    a = acp[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def sample_timesteps(n: int, generator: torch.Generator, device=None, antithetic: bool = True,
                     num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """n training timesteps; antithetic (Diff-Pruning): draw n//2+1 uniform t, append T-1-t, keep the first n,
    so that noisy and clean ends of the schedule are sampled in pairs (lower-variance gradient)."""
    device = device or generator.device
    if not antithetic:
        return torch.randint(0, num_timesteps, (n,), generator=generator, device=device)
    t = torch.randint(0, num_timesteps, (n // 2 + 1,), generator=generator, device=device)
    return torch.cat([t, num_timesteps - 1 - t])[:n]


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def diffusion_loss(pred: torch.Tensor, eps: torch.Tensor, teacher_pred: torch.Tensor | None = None,
                   distill_weight: float = 0.7, reduction: str = "mean") -> torch.Tensor:
    """Epsilon-prediction MSE; with a teacher, distill_weight*|pred-teacher|^2 + (1-distill_weight)*|pred-eps|^2.
    reduction "mean": mean over all elements; "sum": summed over each sample's pixels, mean over the batch."""
    def mse(a, b):
        d = (a.float() - b.float()).square()
        return d.flatten(1).sum(1).mean() if reduction == "sum" else d.mean()
    if teacher_pred is None:
        return mse(pred, eps)
    return distill_weight * mse(pred, teacher_pred) + (1.0 - distill_weight) * mse(pred, eps)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of (1-based) step: linear warm-up, then constant."""
    if config.warmup and step <= config.warmup:
        return config.lr * step / config.warmup
    return config.lr


def ema_decay_at(step: int, config: TrainConfig) -> float:
    if not config.ema_warmup:
        return config.ema_decay
    k = step - 1
    return min(config.ema_decay, (1 + k) / (10 + k))


# ----- the loop -----------------------------------------------------------------------------------------------

def train_diffusion(model, images, labels, out_dir, config: TrainConfig, *, teacher=None, save_fn=None,
                    progress: bool = True):
    """Train (or fine-tune) `model` with the DDPM epsilon loss on images (N, C, H, W) in [-1, 1] and int labels
    (N,) (None for unconditional models); resumes from out_dir/checkpoint when one exists.

    Writes out_dir/train_config.json, out_dir/loss.csv (step, loss, lr, seconds), out_dir/checkpoint/,
    out_dir/model (EMA weights through save_fn(model, dir); default: fp16 diffusers save_pretrained),
    out_dir/loss.png, out_dir/samples.png and out_dir/train_state.json. When it stops early (max_minutes,
    stop_at) it still writes a checkpoint and a snapshot of out_dir/model; train_state.json says
    finished: false and running again resumes. On SIGINT/SIGTERM it checkpoints, then raises TrainingInterrupted.

    Returns `model` itself, holding the EMA weights (float32, eval mode, on the training device).
    Runs data-parallel under `accelerate launch` (config.batch_size is the global batch)."""
    config = copy.deepcopy(config).validate()
    out_dir = Path(out_dir)
    adapter = get_adapter(model)
    if adapter.conditioning == "text":
        raise DiffpruneError(f"training supports pixel-space unconditional or class-conditional denoisers, "
                             f"not text-conditional {type(model).__name__}")
    acc = _accelerator(config)
    device = acc.device
    world, rank = acc.num_processes, acc.process_index
    share = local_share(config.batch_size, acc, "--batch-size")
    local_batch = share.stop - share.start
    images, labels, null_class = _check_data(model, adapter, images, labels, local_batch)
    autocast = config.mixed_precision == "bf16" and device.type == "cuda"

    # ---- state: fresh, or restored from the last checkpoint ----
    model.float().to(device)  # fp32 master weights (autocast does the bf16 part)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    opt = _make_optimizer(params, config, device)
    ema = [p.detach().clone().float() for p in params]
    gens = _Generators(config.seed, rank, device)
    data = _DataOrder(len(images), config.seed, device)
    start, seconds = 0, 0.0
    ckpt_root = out_dir / "checkpoint"
    latest = _latest_checkpoint(ckpt_root)
    if latest is not None:
        saved = _read_checkpoint(latest, model, opt, ema, named, gens, data, rank, world)
        old = TrainConfig.from_dict(saved["config"])
        diffs = config.recipe_differences(old)
        if diffs:
            raise DiffpruneError(f"{out_dir} holds a run started with other settings ({'; '.join(diffs)}); "
                                 f"resume with the same settings, or start over in another directory")
        start, seconds = saved["step"], saved["seconds"]
    elif rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for stale in ckpt_root.glob(".step-*.partial"):  # a checkpoint a kill interrupted
            shutil.rmtree(stale, ignore_errors=True)
        # the run's identity, written before any step: a run killed before its first checkpoint is still known
        # as one (`diffprune train` then starts it over with these settings)
        _write_json(out_dir / "train_config.json", {
            "config": config.to_dict(), "model_class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "images": int(len(images)),
            "processes": world, "diffprune_checkpoint_format": _FORMAT})
        _truncate_log(out_dir / "loss.csv", start)
    acc.wait_for_everyone()

    # data-parallel wrapper; the adapter's call convention runs through it via _Forward
    ddp_model = acc.prepare(model) if world > 1 else model
    forward = _Forward(ddp_model, model)
    acp = alphas_cumprod().to(device)
    images, labels = images.to(device), (labels.to(device) if labels is not None else None)
    if teacher is not None:
        teacher = teacher.to(device, torch.float32).eval().requires_grad_(False)
        teacher_adapter = get_adapter(teacher)

    stop = _StopFlag()
    t_start = time.monotonic()
    stopped, last_saved = None, start if latest is not None else -1
    last_save_time = t_start
    log_sum, log_n = torch.zeros((), device=device), 0
    bar = _progress_bar(config.steps, start, progress and acc.is_main_process)
    step = start
    with _no_label_dropout_in_model(model), stop.installed():
        while step < config.steps:
            step += 1
            lr = lr_at(step, config)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = data.next_indices(config.batch_size)[share]
            x0 = images[idx]
            t = sample_timesteps(local_batch, gens.device, device, config.antithetic)
            noise = torch.randn(x0.shape, generator=gens.device, device=device)
            xt = add_noise(x0, noise, t, acp)
            cond = {}
            if labels is not None:
                cond = {"class_labels": drop_labels(labels[idx], config.label_dropout, null_class, gens.device)}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                pred = adapter.predict_noise(forward, xt, t, cond)
                target_t = None
                if teacher is not None:
                    with torch.no_grad():
                        target_t = teacher_adapter.predict_noise(teacher, xt, t, cond)
            loss = diffusion_loss(pred, noise, target_t, config.distill_weight, config.loss_reduction)
            acc.backward(loss)
            if config.grad_clip:
                acc.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay_at(step, config))
            log_sum += loss.detach()
            log_n += 1
            bar.update(1)

            at_log = step % config.log_every == 0 or step == config.steps
            # every process must agree to stop: one process checks each step, several only at log rows (a sync)
            time_due = False
            if world == 1 or at_log:
                stopped = _stop_reason(stop, config, t_start, acc, world)
                time_due = _any_process(time.monotonic() - last_save_time >= config.checkpoint_minutes * 60,
                                        acc, world)
            if config.stop_at is not None and step == config.stop_at and step < config.steps:
                stopped = stopped or "stop_at"
            if at_log or stopped:
                mean_loss = acc.reduce(log_sum / log_n, "mean").item()  # one sync per log row
                log_sum.zero_()
                log_n = 0
                elapsed = seconds + time.monotonic() - t_start
                if rank == 0:
                    _append_log(out_dir / "loss.csv", step, mean_loss, lr, elapsed)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if step % config.checkpoint_every == 0 or time_due or stopped or step == config.steps:
                _save_checkpoint(ckpt_root, step, seconds + time.monotonic() - t_start, config, model, opt,
                                 ema, named, gens, data, acc)
                last_saved, last_save_time = step, time.monotonic()
            if config.sample_every and step % config.sample_every == 0 and step < config.steps and rank == 0:
                _write_grid(_ema_copy(model, ema, params), out_dir / "samples" / f"step-{step:08d}.png", config)
            if stopped:
                break
    bar.close()
    seconds += time.monotonic() - t_start
    if last_saved != step:
        _save_checkpoint(ckpt_root, step, seconds, config, model, opt, ema, named, gens, data, acc)
    finished = step >= config.steps

    # ---- the result: EMA weights in place, exported model, plots, state ----
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    model.eval()
    if rank == 0:
        export = copy.deepcopy(model).float().cpu()
        with output_directory(out_dir / "model", overwrite=True) as tmp:
            (save_fn or save_diffusers_fp16)(export, tmp)
        if config.plot:
            _plot_loss(out_dir / "loss.csv", out_dir / "loss.png")
        if config.grid and stopped != "interrupted":  # after a signal, time may be short
            _write_grid(model, out_dir / "samples.png", config)
        _write_json(out_dir / "train_state.json", {
            "step": step, "steps": config.steps, "finished": finished, "stopped": stopped if not finished else None,
            "seconds": round(seconds, 1), "processes": world})
        msg = (f"finished {step} steps" if finished else
               f"stopped at step {step} of {config.steps} ({stopped}); run again to resume")
        _say(f"{msg}; EMA model in {out_dir / 'model'}", progress)
    acc.wait_for_everyone()
    if stopped == "interrupted":
        raise TrainingInterrupted(f"interrupted at step {step} of {config.steps}; a checkpoint is in {ckpt_root}: "
                                  f"run the same command again to resume")
    return model


def training_status(out_dir) -> dict | None:
    """train_state.json of a run ({step, steps, finished, ...}), or None before the first run ended."""
    p = Path(out_dir) / "train_state.json"
    if not p.exists():
        return None
    try:
        state = read_json(p)
    except DiffpruneError as e:
        raise DiffpruneError(f"{p} is corrupt ({e}); delete it to resume from the checkpoint") from None
    if not isinstance(state, dict):
        raise DiffpruneError(f"{p} is corrupt (not an object); delete it to resume from the checkpoint")
    return state


def has_checkpoint(out_dir) -> bool:
    return (Path(out_dir) / "checkpoint" / "latest").exists()


def started_run(out_dir) -> dict | None:
    """{"config": dict, "step": 0} of a run that wrote its identity (train_config.json) but no checkpoint yet
    (killed in its first moments), or None when out_dir holds no such file."""
    p = Path(out_dir) / "train_config.json"
    try:
        doc = read_json(p)
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise DiffpruneError(f"{p} is not a diffprune training run's settings; choose another --out or pass "
                             f"--overwrite")
    return {"config": dict(doc["config"]), "step": 0}


def saved_run(out_dir) -> dict | None:
    """{"config": dict, "step": int} of the checkpoint a run in out_dir would resume from, or None."""
    ckpt = _latest_checkpoint(Path(out_dir) / "checkpoint")
    if ckpt is None:
        return None
    try:
        state = read_json(ckpt / "state.json")
        return {"config": dict(state["config"]), "step": int(state["step"])}
    except (OSError, ValueError, KeyError, TypeError, DiffpruneError) as e:
        raise DiffpruneError(f"checkpoint {ckpt} is corrupt ({e}); delete {ckpt.parent} to start over "
                             f"(or pass --overwrite)") from e


def save_diffusers_fp16(model, directory):
    """Default save_fn: diffusers save_pretrained of an fp16 copy, safetensors only."""
    model.half().save_pretrained(directory, safe_serialization=True)


# ----- helpers: accelerate, data, stopping ----------------------------------------------------------------------

def _accelerator(config: TrainConfig):
    """An Accelerator for devices, processes, DDP and gradient clipping. Mixed precision is done with
    torch.autocast in the loop instead of accelerate's forward patching, so the model object stays plain
    (it is deep-copied for export and handed back to the caller)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    if config.device == "cuda" and not torch.cuda.is_available():
        raise DiffpruneError("--device cuda, but no CUDA GPU is available; use --device cpu")
    kwargs = {"mixed_precision": "no"}
    if config.device == "cpu":
        kwargs["cpu"] = True
    try:
        acc = Accelerator(**kwargs)
    except ValueError:  # a process-wide state made with other settings earlier (library use, tests)
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(**kwargs)
    if config.device == "cpu" and acc.device.type != "cpu" or config.device == "cuda" and acc.device.type != "cuda":
        if acc.num_processes > 1:
            raise DiffpruneError(f"--device {config.device} conflicts with the accelerate launch configuration")
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = Accelerator(**kwargs)
    if acc.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return acc


class _Forward:
    """Calls the (possibly DDP-wrapped) module while exposing the inner model's config to the adapter."""

    def __init__(self, wrapped, inner):
        self.wrapped, self.config = wrapped, inner.config

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)


def _check_data(model, adapter, images, labels, local_batch):
    if not torch.is_tensor(images) or images.ndim != 4 or not images.is_floating_point():
        raise DiffpruneError("images must be a float tensor (N, C, H, W) in [-1, 1]")
    adapter.check_input(model, images[:1])
    if len(images) < local_batch:
        raise DiffpruneError(f"{len(images)} training images, fewer than one batch of {local_batch}; "
                             f"lower --batch-size or use more data")
    class_cond = adapter.is_class_conditional(model)
    if not class_cond:
        return images.float(), None, None
    if labels is None:
        raise DiffpruneError(f"{type(model).__name__} is class-conditional: pass the labels of the images")
    labels = torch.as_tensor(labels).long()
    if labels.shape != (len(images),):
        raise DiffpruneError(f"labels have shape {tuple(labels.shape)}, expected ({len(images)},)")
    null_class = int(adapter.null_condition(model, 1)["class_labels"][0])
    if labels.min() < 0 or labels.max() >= null_class:
        raise DiffpruneError(f"labels must lie in [0, {null_class - 1}] for this model "
                             f"(index {null_class} is its null class); got {int(labels.min())}..{int(labels.max())}")
    return images.float(), labels, null_class


@contextlib.contextmanager
def _no_label_dropout_in_model(model):
    """diffusers' DiT drops labels itself in train mode (LabelEmbedding.dropout_prob, global RNG); we drop them
    explicitly with our own generator instead, so turn the internal one off while training."""
    saved = []
    for m in model.modules():
        if type(m).__name__ == "LabelEmbedding" and getattr(m, "dropout_prob", 0) > 0:
            saved.append((m, m.dropout_prob))
            m.dropout_prob = 0.0
    try:
        yield
    finally:
        for m, p in saved:
            m.dropout_prob = p


class _Generators:
    """The training RNG of one process: timesteps, noise and label dropout come from one generator on the
    training device (seeded by seed and rank), so resuming only needs its state."""

    def __init__(self, seed, rank, device):
        self.device = torch.Generator(device=device)
        self.device.manual_seed(seed * 1_000_003 + rank + 1)


class _DataOrder:
    """Epoch-wise random permutations of the data set, identical on every process (each takes its slice of the
    global batch). State: epoch, position, and the generator state the epoch's permutation was drawn from.
    The permutation lives on the training device: a per-step host-to-device copy would synchronise the stream."""

    def __init__(self, n, seed, device="cpu"):
        self.n, self.device = n, device
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.pos, self.perm = 0, 0, None
        self._new_epoch(first=True)

    def _new_epoch(self, first=False):
        if not first:
            self.epoch += 1
        self.epoch_gen_state = self.gen.get_state()
        self.perm = torch.randperm(self.n, generator=self.gen).to(self.device)
        self.pos = 0

    def next_indices(self, batch):
        if self.pos + batch > self.n:  # drop the remainder: every batch is full
            self._new_epoch()
        idx = self.perm[self.pos:self.pos + batch]
        self.pos += batch
        return idx

    def state(self):
        return {"n": self.n, "epoch": self.epoch, "pos": self.pos, "gen": _b64(self.epoch_gen_state)}

    def load(self, s):
        if s["n"] != self.n:
            raise DiffpruneError(f"the checkpoint was trained on {s['n']} images, this run has {self.n}; "
                                 f"use the same data to resume")
        self.gen.set_state(_unb64_tensor(s["gen"]))
        self._new_epoch(first=True)
        self.epoch, self.pos = s["epoch"], s["pos"]


def _make_optimizer(params, config, device):
    kw = dict(lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay)
    if device.type == "cuda":
        kw["fused"] = True  # a few kernels instead of one per tensor: this GPU is launch-bound
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, **kw)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop stops at the next step boundary with a consistent checkpoint.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.set = False

    def _handler(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        old = {}
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: no handlers, interrupts behave as usual
            pass
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _stop_reason(stop, config, t_start, acc, world):
    """None, "max_minutes" or "interrupted" (a signal); with several processes, the strongest of any of them."""
    reason = 0
    if stop.set:
        reason = 2
    elif config.max_minutes is not None and time.monotonic() - t_start >= config.max_minutes * 60:
        reason = 1
    if world > 1:
        reason = int(acc.gather(torch.tensor([reason], device=acc.device)).max().item())
    return (None, "max_minutes", "interrupted")[reason]


def _any_process(flag: bool, acc, world) -> bool:
    """True on every process when `flag` is true on any (every process must take a checkpoint together)."""
    if world == 1:
        return flag
    return bool(acc.gather(torch.tensor([int(flag)], device=acc.device)).max().item())


def _progress_bar(total, initial, enabled):
    from tqdm.auto import tqdm
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, desc="training", dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, smoothing=0.05)


def _say(msg, progress):
    if progress:
        from tqdm.auto import tqdm
        tqdm.write(msg, file=sys.stderr)


# ----- checkpoints -----------------------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64_tensor(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def _rng_state(gens: _Generators) -> dict:
    np_state = np.random.get_state()
    state = {"python": _jsonable(random.getstate()),
             "numpy": [np_state[0], base64.b64encode(np_state[1].tobytes()).decode(), *map(float, np_state[2:])],
             "torch": _b64(torch.get_rng_state()), "train": _b64(gens.device.get_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict, gens: _Generators):
    random.setstate(_tupled(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.frombuffer(base64.b64decode(keys), dtype=np.uint32).copy(), int(pos),
                         int(has_gauss), cached))
    torch.set_rng_state(_unb64_tensor(state["torch"]))
    gens.device.set_state(_unb64_tensor(state["train"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64_tensor(state["cuda"]))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


def _tensor_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _optimizer_split(opt, named):
    """Optimizer state as (tensors for safetensors, JSON-able rest), keyed by parameter name."""
    sd = opt.state_dict()
    names = [n for n, _ in named]
    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{names[i]}::{k}"] = v
            else:
                scalars[f"{names[i]}::{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups,
                     "group_sizes": [len(g["params"]) for g in sd["param_groups"]]}


def _optimizer_join(opt, named, tensors, rest):
    names = [n for n, _ in named]
    state = {}
    for key, v in list(tensors.items()) + list(rest["scalars"].items()):
        pname, k = key.split("::", 1)
        if pname not in names:
            raise DiffpruneError(f"optimizer state names parameter {pname!r}, which the model does not have")
        state.setdefault(names.index(pname), {})[k] = v
    current = opt.state_dict()["param_groups"]
    if [len(g["params"]) for g in current] != rest["group_sizes"]:
        raise DiffpruneError("the checkpoint's optimizer does not match this model's parameters")
    groups = []
    for g_saved, g_now in zip(rest["param_groups"], current):
        g = dict(g_saved)
        g["betas"] = tuple(g["betas"])
        for impl in ("fused", "foreach", "capturable", "differentiable"):  # how, not what: follow this device
            if impl in g_now:
                g[impl] = g_now[impl]
        g["params"] = g_now["params"]
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def _save_checkpoint(root: Path, step, seconds, config, model, opt, ema, named, gens, data, acc):
    """Write checkpoint step-XXXXXXXX under a temporary name, rename it into place, then point `latest` at it
    and delete older ones. Every process writes its own RNG state into the same directory."""
    rank = acc.process_index
    name = f"step-{step:08d}"
    tmp = root / f".{name}.partial"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    _write_json(tmp / f"rng-rank{rank}.json", _rng_state(gens))
    if rank == 0:
        files = {
            "model.safetensors": _tensor_bytes(model.state_dict()),
            "ema.safetensors": _tensor_bytes({n: e for (n, _), e in zip(named, ema)}),
        }
        opt_tensors, opt_rest = _optimizer_split(opt, named)
        files["optimizer.safetensors"] = _tensor_bytes(opt_tensors)
        for fname, blob in files.items():
            (tmp / fname).write_bytes(blob)
        _write_json(tmp / "state.json", {
            "format": _FORMAT, "step": step, "seconds": seconds, "processes": acc.num_processes,
            "config": config.to_dict(), "data": data.state(), "optimizer": opt_rest,
            "sha256": {f: hashlib.sha256(b).hexdigest() for f, b in files.items()}})
    acc.wait_for_everyone()
    if rank == 0:
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", name + "\n")
        for old in root.iterdir():
            if old.name != name and old.name != "latest" and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = "?"
    path = root / name
    if not name.startswith("step-") or not (path / "state.json").exists():
        raise DiffpruneError(f"{pointer} names {name!r}, which is not a complete checkpoint; the checkpoint is "
                             f"corrupt: delete {root} to start over (or pass --overwrite)")
    return path


def _read_checkpoint(path: Path, model, opt, ema, named, gens, data, rank, world) -> dict:
    from safetensors.torch import load
    corrupt = f"delete {path.parent} to start over (or pass --overwrite)"
    try:
        state = read_json(path / "state.json")
        blobs = {f: (path / f).read_bytes() for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}
    except (OSError, DiffpruneError) as e:
        raise DiffpruneError(f"checkpoint {path} is corrupt ({e}); {corrupt}") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT or not isinstance(state.get("sha256"), dict):
        raise DiffpruneError(f"checkpoint {path} has format {state.get('format')}, this diffprune reads {_FORMAT}")
    for f, blob in blobs.items():
        if hashlib.sha256(blob).hexdigest() != state["sha256"].get(f):
            raise DiffpruneError(f"checkpoint file {path / f} is corrupt (checksum mismatch); {corrupt}")
    device = next(model.parameters()).device
    # clone: load() may hand back views of the byte buffer; give every tensor its own storage
    tensors = {f: {k: v.clone() for k, v in load(b).items()} for f, b in blobs.items()}
    try:
        model.load_state_dict(tensors["model.safetensors"], strict=True)
    except RuntimeError as e:
        raise DiffpruneError(f"checkpoint {path} does not match this model's architecture: {e}") from e
    ema_t = tensors["ema.safetensors"]
    for (n, _), e in zip(named, ema):
        if n not in ema_t or ema_t[n].shape != e.shape:
            raise DiffpruneError(f"checkpoint {path}: EMA weights do not match the model (at {n})")
        e.copy_(ema_t[n].to(device))
    _optimizer_join(opt, named, tensors["optimizer.safetensors"], state["optimizer"])
    data.load(state["data"])
    rng_file = path / f"rng-rank{rank}.json"
    if state.get("processes") != world or not rng_file.exists():
        print(f"note: checkpoint written by {state.get('processes')} processes, resuming with {world}: "
              f"the data order is kept but the random streams are reseeded (not bit-exact)", file=sys.stderr)
        gens.device.manual_seed(gens.device.initial_seed() + state["step"])
    else:
        try:
            _set_rng_state(read_json(rng_file), gens)
        except (OSError, DiffpruneError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise DiffpruneError(f"checkpoint file {rng_file} is corrupt ({e}); {corrupt}") from e
    return state


def _write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


# ----- logs, plots, samples ----------------------------------------------------------------------------------

_LOG_HEADER = ["step", "loss", "lr", "seconds"]


def _truncate_log(path: Path, step: int):
    """Keep the rows up to the checkpoint being resumed from (rows after it are about to be redone)."""
    rows = []
    if path.exists() and step > 0:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= step]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([_LOG_HEADER] + rows)
    atomic_write_text(path, buf.getvalue())


def _append_log(path: Path, step, loss, lr, seconds):
    with open(path, "a") as f:
        f.write(f"{step},{loss:.6g},{lr:.6g},{seconds:.1f}\n")


def read_loss_log(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{"step": int(r["step"]), "loss": float(r["loss"]), "lr": float(r["lr"]),
                 "seconds": float(r["seconds"])} for r in csv.DictReader(f)]


def _plot_loss(csv_path: Path, png_path: Path):
    rows = read_loss_log(csv_path)
    if not rows:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, marker="." if len(rows) < 50 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(f"training loss ({png_path.parent.name})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())


def _ema_copy(model, ema, params):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip([p for p in m.parameters() if p.requires_grad], ema):
            p.copy_(e)
    return m.eval()


def _write_grid(model, path: Path, config: TrainConfig, per_class: int = 10):
    """A grid of samples (rows: classes, for class-conditional models) with DDIM and classifier-free guidance,
    through diffprune.sampling.sample. Only for 1- or 3-channel (pixel) models."""
    c = model.config.in_channels
    if c not in (1, 3):
        return
    adapter = get_adapter(model)
    was_training = model.training
    model.eval()
    class_cond = adapter.is_class_conditional(model)
    if class_cond:
        n_cls = min(adapter.num_classes(model), 10)
        labels = torch.arange(n_cls).repeat_interleave(per_class)
        x = sample(model, config.grid_steps, "ddim", labels=labels, guidance_scale=config.grid_guidance,
                   seed=config.seed)
        rows = n_cls
    else:
        x = sample(model, config.grid_steps, "ddim", batch=per_class * per_class, seed=config.seed)
        rows = per_class
    model.train(was_training)
    write_image_grid(x, path, rows)


def write_image_grid(x: torch.Tensor, path, rows: int):
    """Save images (B, C, H, W) in [-1, 1] as one PNG grid of `rows` rows (atomically)."""
    from PIL import Image
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    b, c, h, w = x.shape
    cols = math.ceil(b / rows)
    pad = torch.zeros(rows * cols - b, c, h, w, dtype=torch.uint8)
    g = torch.cat([x, pad]).view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    img = Image.fromarray(g.squeeze(-1).numpy() if c == 1 else g.numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
