"""Per-channel importance of one dependency group (the layers torch-pruning couples to a root's channels), as
small scorer classes in the manner of torch-pruning's Importance; make_importance(name) gives one.

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


class Importance:
    """Scores for one dependency group, as torch-pruning's Importance: `scorer(group)` gives one score per channel
    of the group's root (len(group[0].idxs)); lower = pruned first. One object scores all the groups of one model
    (it caches the scores of layers that several groups share)."""
    name = ""
    needs_gradients = False   # scores read .grad: the timestep walk must run first
    walks_to_threshold = False  # the walk stops at the loss threshold (Diff-Pruning) instead of visiting every t
    reinitialises = False     # the pruned model gets fresh weights afterwards (training from scratch)

    def __init__(self, reduction: str = "paper", norm: int = 2):
        self.reduction, self.norm = reduction, norm
        self.cache: dict = {}

    def __call__(self, group) -> torch.Tensor:
        def items():
            for item in group:
                roots = list(item.root_idxs)
                if isinstance(item.dep.target.module, nn.Module) and not any(r is None for r in roots):
                    yield (item.dep.target.module, item.dep.handler.__name__ == "prune_out_channels",
                           list(item.idxs), roots)
        return self.score_layers(len(group[0].idxs), items())

    def score_layers(self, n: int, items) -> torch.Tensor:
        """One score per channel of a group of n channels, from (layer, out, idxs, roots) items: the layer's
        channels `idxs` along its output (out=True) or input axis carry the group's channels `roots`. Groups that
        torch-pruning cannot trace (FLUX/SD3 blocks, mmdit.py) are scored through here directly."""
        total = torch.zeros(n, dtype=torch.float64)
        layers = 0
        for layer, out, idxs, roots in items:
            if isinstance(layer, nn.GroupNorm) and self.reduction == "port":
                continue  # torch-pruning 1.6 does not score GroupNorm
            axis = _channel_axis(layer, out)
            if axis is None:
                continue
            key = (id(layer), axis)
            if key not in self.cache:
                self.cache[key] = _layer_scores(layer, axis, self.name, self.reduction, self.norm).double().cpu()
            local = self.cache[key][torch.as_tensor(idxs, dtype=torch.long)]
            total.scatter_add_(0, torch.as_tensor(roots, dtype=torch.long), local)
            layers += 1
        if layers == 0:
            raise DiffpruneError("internal: a dependency group has no scorable layer")
        if self.reduction == "port":
            total = total / layers
            mean = total.mean()
            if mean > 0:
                total = total / mean
        return total.float()

    def unit_scores(self, model, units) -> dict[str, float]:
        """One score per removable depth unit (depth.DepthUnit) from the weights alone. The gradient criteria score
        units during the timestep walk instead (depth.record_unit_scores)."""
        raise DiffpruneError(f"internal: {self.name} scores depth units from gradients, during the timestep walk")


class DiffPruningImportance(Importance):
    """Taylor scores with gradients summed over the timesteps the walk selects (until the loss threshold)."""
    name, needs_gradients, walks_to_threshold = "diff-pruning", True, True


class TaylorImportance(Importance):
    """The same gradients over all timesteps, "sum then abs" per channel."""
    name, needs_gradients = "taylor", True


class MagnitudeImportance(Importance):
    """sum_slice |w|^p (norm p = 2 by default, 1 for L1); a depth unit: mean |w|^p over its weight matrices."""
    name = "magnitude"

    def unit_scores(self, model, units) -> dict[str, float]:
        scores = {}
        for u in units:
            ws = [p.detach().float() for m in u.modules for n, p in model.get_submodule(m).named_parameters()
                  if n.endswith("weight") and p.ndim > 1]
            total = sum(float(w.abs().pow(self.norm).sum()) for w in ws)
            scores[u.name] = total / max(sum(w.numel() for w in ws), 1)
        return scores


class RandomImportance(Importance):
    """Uniform random scores from a seeded generator; `reinit` also re-initialises the pruned model."""
    name = "random"

    def __init__(self, reduction: str = "paper", norm: int = 2, seed: int = 0, reinit: bool = False):
        super().__init__(reduction, norm)
        self.seed, self.generator = seed, torch.Generator().manual_seed(seed)
        self.reinitialises = reinit
        self.name = "reinit" if reinit else "random"

    def unit_scores(self, model, units) -> dict[str, float]:
        # a generator of its own: in mode "both" the width groups' draws stay what they are in mode "width"
        r = torch.rand(len(units), generator=torch.Generator().manual_seed(self.seed))
        return {u.name: float(s) for u, s in zip(units, r)}

    def score_layers(self, n: int, items) -> torch.Tensor:
        return torch.rand(n, generator=self.generator)


def make_importance(criterion: str, reduction: str = "paper", norm: int = 2, seed: int = 0) -> Importance:
    """The scorer a criterion name stands for (the one place a name becomes an object)."""
    check_criterion(criterion, reduction, norm)
    if criterion in ("random", "reinit"):
        return RandomImportance(reduction, norm, seed=seed, reinit=criterion == "reinit")
    kinds = {"diff-pruning": DiffPruningImportance, "taylor": TaylorImportance, "magnitude": MagnitudeImportance}
    return kinds[criterion](reduction, norm)
