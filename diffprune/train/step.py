"""The pieces of one training step, public so that they are tested and reusable: timesteps, label dropout, the
loss, the learning-rate and EMA schedules. The noising itself is diffprune.noise.add_noise."""
from __future__ import annotations

import torch

from .config import NUM_TRAIN_TIMESTEPS, TrainConfig


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

