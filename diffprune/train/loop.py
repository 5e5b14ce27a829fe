"""The training loop, readable top to bottom: DDPM epsilon-prediction MSE on pixel-space denoisers, label dropout
for classifier-free guidance, EMA, optional distillation from a dense teacher, resumable checkpoints, data
parallel under `accelerate launch`."""
from __future__ import annotations

import contextlib
import copy
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from ..distributed import local_share, resolve_device
from ..errors import DiffpruneError
from ..models import get_adapter
from ..noise import add_noise, alphas_cumprod
from ..util import output_directory
from . import checkpoint, logs
from .checkpoint import DataOrder, Generators
from .config import TrainConfig, TrainingInterrupted
from .step import diffusion_loss, drop_labels, ema_decay_at, lr_at, sample_timesteps


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
    gens = Generators(config.seed, rank, device)
    data = DataOrder(len(images), config.seed, device)
    start, seconds = 0, 0.0
    ckpt_root = out_dir / "checkpoint"
    latest = checkpoint.latest(ckpt_root)
    if latest is not None:
        saved = checkpoint.read(latest, model, opt, ema, named, gens, data, rank, world)
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
        checkpoint.write_json(out_dir / "train_config.json", {
            "config": config.to_dict(), "model_class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "images": int(len(images)),
            "processes": world, "diffprune_checkpoint_format": checkpoint.FORMAT})
        logs.truncate(out_dir / "loss.csv", start)
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
                    logs.append(out_dir / "loss.csv", step, mean_loss, lr, elapsed)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            if step % config.checkpoint_every == 0 or time_due or stopped or step == config.steps:
                checkpoint.save(ckpt_root, step, seconds + time.monotonic() - t_start, config, model, opt,
                                 ema, named, gens, data, acc)
                last_saved, last_save_time = step, time.monotonic()
            if config.sample_every and step % config.sample_every == 0 and step < config.steps and rank == 0:
                logs.write_samples(_ema_copy(model, ema, params), out_dir / "samples" / f"step-{step:08d}.png", config)
            if stopped:
                break
    bar.close()
    seconds += time.monotonic() - t_start
    if last_saved != step:
        checkpoint.save(ckpt_root, step, seconds, config, model, opt, ema, named, gens, data, acc)
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
            logs.plot(out_dir / "loss.csv", out_dir / "loss.png")
        if config.grid and stopped != "interrupted":  # after a signal, time may be short
            logs.write_samples(model, out_dir / "samples.png", config)
        checkpoint.write_json(out_dir / "train_state.json", {
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


def save_diffusers_fp16(model, directory):
    """Default save_fn: diffusers save_pretrained of an fp16 copy, safetensors only."""
    model.half().save_pretrained(directory, safe_serialization=True)


def _accelerator(config: TrainConfig):
    """An Accelerator for devices, processes, DDP and gradient clipping. Mixed precision is done with
    torch.autocast in the loop instead of accelerate's forward patching, so the model object stays plain
    (it is deep-copied for export and handed back to the caller)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    resolve_device(config.device)  # a CUDA device that is not there is refused here, as everywhere
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


def _ema_copy(model, ema, params):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, e in zip([p for p in m.parameters() if p.requires_grad], ema):
            p.copy_(e)
    return m.eval()

