"""Arguments and loading shared by the subcommands that generate images."""
from __future__ import annotations

import torch

from ..errors import DiffpruneError


def add_sampling_args(p, steps: int = 50, cfg: float = 2.0):
    p.add_argument("--steps", type=int, help=f"sampler steps (default: the --schedule's, else {steps})")
    p.add_argument("--sampler", help="ddim, ddpm, plms, dpm-solver++ or lcm (default: the --schedule's, else ddim)")
    p.set_defaults(default_steps=steps)
    p.add_argument("--cfg", type=float, default=cfg, dest="guidance_scale",
                   help=f"classifier-free guidance scale, 1 = none (default {cfg})")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--schedule", help="a schedule JSON from `diffprune search`: skip units as it says")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="model precision (default fp32; fp16/bf16 for GPUs)")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_for_sampling(name: str, device: str, dtype: str):
    """The model (or pipeline) on the asked device and precision, in eval mode."""
    from ..zoo import load_model
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DiffpruneError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise DiffpruneError(f"unknown device {device!r}; use cpu or cuda")
    obj = load_model(name, dtype=DTYPES[dtype])
    obj = obj.to(device)
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    return obj


def load_schedule(path):
    if not path:
        return None
    from ..schedule import Schedule
    return Schedule.load(path)


def resolve_rollout(args, schedule):
    """--steps and --sampler default to the schedule's (else 50 / ddim); a schedule made for another sampler or
    step count is refused with a message."""
    from ..util import positive_int
    args.steps = args.steps if args.steps is not None else (
        schedule.num_steps if schedule is not None else getattr(args, "default_steps", 50))
    args.sampler = args.sampler or (schedule.sampler if schedule is not None else "ddim")
    positive_int(args.steps, "--steps")
    if schedule is not None:
        schedule.check(sampler=args.sampler, num_steps=args.steps)
