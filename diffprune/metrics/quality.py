"""Sample-quality numbers that need no particular network: the Frechet distance between two Gaussians fitted to
features, and the SSIM / PSNR "consistency" between two sample sets generated from identical noise.

Frechet distance: d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). scipy is not a dependency, so the
trace of the matrix square root comes from a symmetric eigendecomposition: with R = S1^(1/2) (from eigh of S1),
R S2 R is symmetric positive semi-definite and has the same eigenvalues as S1 S2 (AB and BA share them), so
tr((S1 S2)^(1/2)) = sum of sqrt(eigvalsh(R S2 R)). Tiny negative eigenvalues from rounding are clipped to 0. This
needs no regularising epsilon, unlike scipy.linalg.sqrtm on a singular product.

SSIM follows Wang et al. (2004) as the Diff-Pruning protocol uses it: images mapped to [0, 1] (data range 1),
11x11 Gaussian window with sigma 1.5 applied without padding ("valid"), C1 = 0.01^2, C2 = 0.03^2, the SSIM map
averaged over channels and pixels per image pair, then over pairs. It is pure torch and differentiable, so it also
serves as a training loss (1 - SSIM).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DiffpruneError


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance

def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, N-1) of features shaped (N, D), in float64."""
    f = feats.detach().double().cpu().numpy() if torch.is_tensor(feats) else np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DiffpruneError(f"feature statistics need at least 2 feature vectors shaped (N, D); got {f.shape}")
    if not np.isfinite(f).all():
        raise DiffpruneError("the features contain NaN or inf (did sampling diverge?)")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _as_statistics(x, name: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, (tuple, list)) and len(x) == 2:
        mu = np.asarray(x[0].detach().cpu() if torch.is_tensor(x[0]) else x[0], dtype=np.float64)
        sigma = np.asarray(x[1].detach().cpu() if torch.is_tensor(x[1]) else x[1], dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
            raise DiffpruneError(f"{name}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return mu, sigma
    return feature_statistics(x)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a, b) -> float:
    """Frechet distance between two feature sets, each given as features (N, D) (tensor or array) or as a
    (mu, sigma) pair. Same units as FID (squared distance, no square root taken)."""
    mu1, s1 = _as_statistics(a, "first argument")
    mu2, s2 = _as_statistics(b, "second argument")
    if mu1.shape != mu2.shape:
        raise DiffpruneError(f"feature dimensions differ ({mu1.size} vs {mu2.size}): the two sets come from "
                             f"different feature networks")
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(d, 0.0)  # a set against itself gives ~-1e-12 from rounding; a distance is never negative


# ---------------------------------------------------------------------------------------------------------------
# consistency between paired images

def _to_unit(x: torch.Tensor, value_range) -> torch.Tensor:
    lo, hi = value_range
    if not hi > lo:
        raise DiffpruneError(f"value_range must be (low, high) with high > low, got {value_range}")
    x = x if x.is_floating_point() else x.float()
    return ((x - lo) / (hi - lo)).clamp(0, 1)


def _pair(a: torch.Tensor, b: torch.Tensor, value_range) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise DiffpruneError(f"paired images must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 3:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.dim() != 4:
        raise DiffpruneError(f"images must be shaped (N, C, H, W) or (C, H, W); got {tuple(a.shape)}")
    return _to_unit(a, value_range), _to_unit(b, value_range)


def _reduce(per_image: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "none":
        return per_image
    raise DiffpruneError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float32, device=None) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, *, value_range=(-1.0, 1.0), window: int = 11, sigma: float = 1.5,
         reduction: str = "mean") -> torch.Tensor:
    """SSIM between paired images a[i], b[i] (N, C, H, W) whose pixel values span value_range (default [-1, 1],
    the samplers' range). Returns the mean over pairs (0-dim tensor) or, with reduction="none", one value per pair.
    Identical images give exactly 1. Images smaller than the window use the largest odd window that fits (no
    11x11 SSIM exists for them; this only happens for tiny test models)."""
    x, y = _pair(a, b, value_range)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    n, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2
    g = gaussian_window(size, sigma, dtype, x.device)
    # every plane filtered alone by one 1-channel kernel: identical planes then give bit-identical moments,
    # which is what makes ssim(x, x) exactly 1
    planes = torch.stack([x, y, x * x, y * y, x * y]).reshape(-1, 1, h, w)
    planes = F.conv2d(F.conv2d(planes, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    mu_x, mu_y, e_xx, e_yy, e_xy = planes.reshape(5, n, c, h - size + 1, w - size + 1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    var_x, var_y, cov = e_xx - mu_x * mu_x, e_yy - mu_y * mu_y, e_xy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return _reduce(s.mean(dim=(1, 2, 3)), reduction)


def psnr(a: torch.Tensor, b: torch.Tensor, *, value_range=(-1.0, 1.0), reduction: str = "mean") -> torch.Tensor:
    """PSNR in dB per image pair after mapping to [0, 1] (peak 1), averaged over pairs. Identical images give
    +inf (no cap), so the mean is inf as soon as one pair is identical; use reduction="none" to see each pair."""
    x, y = _pair(a, b, value_range)
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))
    return _reduce(10 * torch.log10(1.0 / mse), reduction)
