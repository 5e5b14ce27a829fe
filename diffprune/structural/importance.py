"""Per-channel importance of one dependency group (the layers torch-pruning couples to a root's channels).

Criteria (the paper's baselines and its own):
  diff-pruning  Taylor with gradients summed over the selected timesteps; per weight |w * sum_t g|.
  taylor        the same gradients over all timesteps, "sum then abs": per channel |sum_slice w*g|.
  magnitude     sum_slice |w|^p (p=2 by default, p=1 for L1).
  random        uniform random scores (also used by "reinit", which re-initialises afterwards).

Two ways to turn per-layer channel scores into one score per channel of the group:
  paper  (Diff-Pruning's code): diff-pruning scores a channel by sum_slice (w*g)^2; layers are summed plainly;
         GroupNorm affine weights contribute |gamma * dgamma| (|gamma|^p for magnitude); no normalisation.
  port   (torch-pruning 1.6's importance, the later port): diff-pruning uses sum_slice |w*g|; the scores are
         averaged over the coupled layers and divided by their mean; GroupNorm weights are not scored.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import DiffpruneError

CRITERIA = ("diff-pruning", "taylor", "magnitude", "random", "reinit")
REDUCTIONS = ("paper", "port")
GRADIENT_CRITERIA = ("diff-pruning", "taylor")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def check_criterion(criterion: str, reduction: str = "paper", norm: int = 2):
    if criterion not in CRITERIA:
        raise DiffpruneError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if reduction not in REDUCTIONS:
        raise DiffpruneError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if norm not in (1, 2):
        raise DiffpruneError(f"--norm must be 1 or 2 (L1 or L2 magnitude), got {norm!r}")


def _channel_axis(layer: nn.Module, out: bool) -> int | None:
    """The weight axis that holds the pruned channels, or None if the layer is not scored."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.ndim == 0:
        return None
    if isinstance(layer, (nn.Linear, *_CONV)):
        if isinstance(layer, _CONV) and layer.groups != 1:
            return None  # grouped convs do not occur in the supported families
        transposed = isinstance(layer, _CONV) and layer.transposed  # (in, out, ...) layout
        return (1 if transposed else 0) if out else (0 if transposed else 1)
    if isinstance(layer, nn.Embedding):
        return 1  # embedding_dim
    if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)) and out:
        return 0 if w.ndim == 1 else None
    return None


def _layer_scores(layer, axis: int, criterion: str, reduction: str, p: int) -> torch.Tensor:
    """Score of every channel along `axis` (all of them; the caller picks the group's)."""
    w = layer.weight.detach().float()
    others = [d for d in range(w.ndim) if d != axis]
    def per_channel(t):
        return t.sum(dim=others) if others else t
    if criterion == "magnitude":
        return per_channel(w.abs().pow(p))
    g = layer.weight.grad
    # a layer the loss never reached contributes zeros
    wg = w * g.detach().float() if g is not None else torch.zeros_like(w)
    if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
        return wg.abs()                             # |gamma * dgamma|
    if criterion == "taylor":
        return per_channel(wg).abs()                # sum then abs
    return per_channel(wg.square() if reduction == "paper" else wg.abs())


def group_scores(group, criterion: str, reduction: str = "paper", norm: int = 2,
                 generator: torch.Generator | None = None, cache: dict | None = None) -> torch.Tensor:
    """One score per channel of the group's root (len(group[0].idxs)); lower = pruned first. `cache` (a dict
    kept across the groups of one model) avoids rescoring a layer that several groups share."""
    cache = {} if cache is None else cache
    n = len(group[0].idxs)
    if criterion in ("random", "reinit"):
        return torch.rand(n, generator=generator)
    total = torch.zeros(n, dtype=torch.float64)
    layers = 0
    for item in group:
        dep, idxs = item.dep, list(item.idxs)
        layer = dep.target.module
        if not isinstance(layer, nn.Module):
            continue
        if isinstance(layer, nn.GroupNorm) and reduction == "port":
            continue  # torch-pruning 1.6 does not score GroupNorm
        out = dep.handler.__name__ == "prune_out_channels"
        roots = list(item.root_idxs)
        if any(r is None for r in roots):
            continue
        axis = _channel_axis(layer, out)
        if axis is None:
            continue
        key = (id(layer), axis)
        if key not in cache:
            cache[key] = _layer_scores(layer, axis, criterion, reduction, norm).double().cpu()
        local = cache[key][torch.as_tensor(idxs, dtype=torch.long)]
        total.scatter_add_(0, torch.as_tensor(roots, dtype=torch.long), local)
        layers += 1
    if layers == 0:
        raise DiffpruneError("internal: a dependency group has no scorable layer")
    if reduction == "port":
        total = total / layers
        mean = total.mean()
        if mean > 0:
            total = total / mean
    return total.float()
