"""The forward process: the training noise schedule (alphas_cumprod) and the noising formula
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, as DDPMScheduler.add_noise computes it, on the caller's device.

One owner for training (train/), Diff-Pruning's timestep walk (structural/timesteps.py) and the demo's loss curve.
The schedule comes from the same scheduler the samplers use (sampling.make_scheduler("ddpm")), so training and
sampling cannot disagree about it."""
from __future__ import annotations

import torch

from .models import get_adapter
from .sampling import make_scheduler

# Stable Diffusion's training schedule; the pixel models and DiT use the DDPM one (1000 steps, linear betas
# 1e-4..0.02: sampling.make_scheduler("ddpm") with no config)
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon")


def alphas_cumprod(model=None, scheduler_config: dict | None = None) -> torch.Tensor:
    """alphas_cumprod (float32) of a training schedule: the given (pipeline) scheduler config, else SD's for text
    UNets, else the DDPM linear 1e-4..0.02 schedule (also with no model)."""
    if scheduler_config is None and model is not None and get_adapter(model).family == "unet2d-condition":
        scheduler_config = SD_SCHEDULE
    return make_scheduler("ddpm", scheduler_config).alphas_cumprod.to(torch.float32).clone()


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, acp: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * eps, t one timestep per sample (acp on x0's device)."""
    a = acp[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def flow_sigmas(scheduler_config: dict | None = None) -> torch.Tensor:
    """Training noise levels of a rectified-flow model (FLUX, SD3), clean end first: sigma_t for t = 0..N-1, the
    flow-euler scheduler's own grid s = (t+1)/N, shifted as its config says (SD3's static shift 3 without a config;
    a config with dynamic shifting, FLUX's, leaves s unshifted: its shift depends on the image size)."""
    return make_scheduler("flow-euler", scheduler_config).sigmas.to(torch.float32).flip(0).clone()


def add_flow_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps, one sigma per sample: the rectified-flow path, whose velocity target is
    eps - x0."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * eps
