"""Arguments and loading shared by the subcommands that generate images."""
from __future__ import annotations

import torch

from ..distributed import resolve_device
from ..errors import DiffpruneError


CFG_HELP = ("classifier-free guidance scale, 1 = none (default: a text pipeline's own, 7.5 for Stable Diffusion; "
            "2 for class-conditional models; 1 for unconditional ones)")


def add_sampling_args(p, steps: int = 50):
    p.add_argument("--steps", type=int, help=f"sampler steps (default: the --schedule's, else {steps})")
    p.add_argument("--sampler", help="ddim, ddpm, plms, dpm-solver++, lcm or flow-euler (default: the --schedule's, "
                                     "else ddim)")
    p.set_defaults(default_steps=steps)
    p.add_argument("--cfg", type=float, dest="guidance_scale", help=CFG_HELP)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--schedule", help="a schedule JSON from `diffprune search`: skip units as it says")
    add_device_arg(p)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="model precision (default fp32; fp16/bf16 for GPUs)")


DEVICE_HELP = "cpu, cuda (cuda:N) or auto (default auto: cuda when a GPU is visible, else cpu)"


def add_device_arg(p):
    """--device with the one default every command shares."""
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_for_sampling(name: str, device: str, dtype: str):
    """The model (or pipeline) on the asked device and precision, in eval mode."""
    from ..zoo import load_model
    device = resolve_device(device)
    obj = load_model(name, dtype=DTYPES[dtype])
    obj = obj.to(device)
    if isinstance(obj, torch.nn.Module):
        obj.eval()
    return obj


def default_guidance(obj) -> float:
    """The guidance scale a model is meant to run at: a pipeline's own default (its __call__'s guidance_scale:
    7.5 for Stable Diffusion), 2 for conditional denoisers (what the Fashion-MNIST models were tuned with), 1 for
    unconditional ones."""
    import inspect

    from ..models import get_adapter
    from ..util import denoiser_of
    model = denoiser_of(obj)
    if model is not obj:
        param = inspect.signature(type(obj).__call__).parameters.get("guidance_scale")
        if param is not None and isinstance(param.default, (int, float)):
            return float(param.default)
    adapter = get_adapter(model)
    return 2.0 if adapter.conditioning == "text" or adapter.is_class_conditional(model) else 1.0


def claim(args, path, what: str = "--out", overwrite: bool | None = None):
    """Claim an output of this command before its long work (util.claim_output: writable, no other diffprune run
    writing it, an earlier killed run's debris removed), held until the command ends. With `overwrite` given, an
    existing file is refused unless it is True (checked after the claim: no other run can make it meanwhile)."""
    from pathlib import Path

    from ..util import claim_output
    path = Path(path)
    args._claims.enter_context(claim_output(path, what))
    if overwrite is False and path.exists():
        raise DiffpruneError(f"{path} already exists; choose another {what} or pass --overwrite")
    return path


def parse_classes(text):
    """--classes "0,7" -> [0, 7]; a clear error for anything else."""
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise DiffpruneError(f"--classes must be comma-separated integers, got {text!r}") from None


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


def estimate_seconds(model, *, calls: int, batch: int, guided: bool) -> float:
    """Seconds that `calls` denoiser calls at `batch` samples (doubled under guidance) should take on this
    machine, from the median of three calls timed after two warm-up calls (the first calls run slow): said before
    a long job starts, not after."""
    from ..latency import time_denoiser_call
    r = time_denoiser_call(model, batch, cfg=guided, repeats=3, warmup=2)
    return calls * r["median_ms"] / 1e3


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else (f"{seconds / 60:.0f} min" if seconds < 5400
                                                    else f"{seconds / 3600:.1f} h")
