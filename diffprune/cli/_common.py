"""Arguments and loading shared by the subcommands that generate images."""
from __future__ import annotations

from ..distributed import resolve_device  # noqa: F401 (the commands' device check, imported from here)
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
