"""Arguments and loading shared by the subcommands that generate images."""
from __future__ import annotations

import torch

from ..errors import DiffpruneError


def add_sampling_args(p, steps: int = 50, cfg: float = 2.0):
    p.add_argument("--steps", type=int, default=steps, help=f"sampler steps (default {steps})")
    p.add_argument("--sampler", default="ddim", help="ddim, ddpm, plms, dpm-solver++ or lcm (default ddim)")
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
