"""DiP-GO: a small pruner network learns, per (denoiser call, unit), whether to compute the unit or reuse its
cached output; post-processing turns its scores into a static schedule at any target MACs ratio.

Pruner: T x N learnable queries (dim 512) -> an encoder layer (single-head self-attention among the N queries of
a step + FFN, residual + LayerNorm; it really applies here, unlike the released code, and can be switched off to
measure it) -> a separate MLP head per (step, unit), 512 -> 128 -> 128 -> 2 ([skip, keep] logits), computed for
all heads at once with batched einsums. The last layer starts at zero weights and bias (skip 0, keep 1): every
unit starts as keep, so the consistency loss starts at 0 and the sparsity loss at its maximum.

Gates: straight-through one-hot argmax of softmax; the forward value is exactly 0/1 (hard + (p - p.detach())),
so the gated rollout computes exactly what the hard schedule would, while gradients reach the probabilities.

Training runs every unit at every step and blends keep * current + skip * cached (runtime.set_gates). The cached
value is DETACHED: gradients then flow between steps only through the latents, which is what each step's
activation checkpoint saves and recomputes (a side channel into an earlier step's graph would be invisible to the
checkpoint); the gate still gets its exact local gradient (current - cached) and, through the latents, every
later effect of its decision.

Losses: consistency = 1 - SSIM(final image of the gated rollout, final image of the dense rollout) from the same
noise and condition (latent pipelines decode with the VAE); sparsity = alpha * mean over steps of
sum_u g_keep[t, u] * gamma_u, switched off while the hard cascaded kept-MACs fraction is below 1 - target.

gamma_u (cascaded_costs): the share of one denoiser call's MACs that dies when u alone is skipped and every other
unit kept: u itself plus every producer whose outputs then reach the model output only through u
(UnitGraph.step_macs of the full keep row minus that of the row without u). In an SD UNet the last up block's
gamma is the whole step (skipping it kills everything), the mid block's is its own cost; in a DiT the last
block's is the whole step. This is the cost the runtime actually saves by that one decision, read from the traced
data flow, not a hand-written table.

Post-processing (ratios.table_at_ratio): bisection on the keep-score threshold to the target pruned MACs ratio,
the cascade applied; step 0 is never pruned.

This module is the method's objects (the pruner network, its score table, the trained result DipGo and its
options); the training loop is dipgo_train.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DiffpruneError
from ..models import UnitGraph, architecture_hash, build_graph
from ..util import atomic_write_bytes, loads_json, ratio as check_ratio
from .ratios import RATIO_TOLERANCE, pruned_ratio, table_at_ratio  # noqa: F401 (re-exported)
from .schedule import Schedule, collapse_report

PRUNER_FORMAT = "diffprune-dipgo-pruner"
SCORES_FORMAT = "diffprune-dipgo-scores"


# ----- costs and post-processing --------------------------------------------------------------------------------

def cascaded_costs(graph: UnitGraph) -> np.ndarray:
    """gamma_u: share of one call's MACs that dies when unit u alone is skipped (see the module docstring)."""
    full = np.ones(graph.n_units, dtype=bool)
    total = graph.step_macs(full)
    gamma = np.empty(graph.n_units)
    for i in range(graph.n_units):
        row = full.copy()
        row[i] = False
        gamma[i] = (total - graph.step_macs(row)) / total
    return gamma


# ----- the pruner -----------------------------------------------------------------------------------------------

class Pruner(nn.Module):
    def __init__(self, n_calls: int, n_units: int, dim: int = 512, hidden: int = 128, encoder: bool = True,
                 seed: int = 0):
        super().__init__()
        self.n_calls, self.n_units, self.dim, self.hidden, self.use_encoder = n_calls, n_units, dim, hidden, encoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.queries = nn.Parameter(torch.randn(n_calls, n_units, dim))
            if encoder:
                self.attn = nn.MultiheadAttention(dim, num_heads=1, batch_first=True)
                self.norm1 = nn.LayerNorm(dim)
                self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
                self.norm2 = nn.LayerNorm(dim)
            shape = (n_calls, n_units)
            self.w1 = nn.Parameter(_he_uniform((*shape, dim, hidden), dim))
            self.w2 = nn.Parameter(_he_uniform((*shape, hidden, hidden), hidden))
        self.b1 = nn.Parameter(torch.zeros(*shape, hidden))
        self.b2 = nn.Parameter(torch.zeros(*shape, hidden))
        self.w3 = nn.Parameter(torch.zeros(*shape, hidden, 2))
        self.b3 = nn.Parameter(torch.tensor([0.0, 1.0]).expand(*shape, 2).clone())

    def encode(self) -> torch.Tensor:
        q = self.queries
        if not self.use_encoder:
            return q
        # the N queries of one step attend to each other (steps are the batch)
        h = self.norm1(q + self.attn(q, q, q, need_weights=False)[0])
        return self.norm2(h + self.ffn(h))

    def forward(self) -> torch.Tensor:
        """[skip, keep] logits, (n_calls, n_units, 2)."""
        h = self.encode()
        h = F.relu(torch.einsum("tnd,tndh->tnh", h, self.w1) + self.b1)
        h = F.relu(torch.einsum("tnd,tndh->tnh", h, self.w2) + self.b2)
        return torch.einsum("tnd,tndh->tnh", h, self.w3) + self.b3

    def gates(self, table=None) -> torch.Tensor:
        """Straight-through one-hot [skip, keep] gates; forward values exactly 0/1, step 0 always keep. The hard
        values are the argmax of each cell's logits, or `table` (a keep table) where given."""
        logits = self()
        probs = logits.softmax(-1)
        if table is None:
            keep = (logits[..., 1] >= logits[..., 0]).to(probs.dtype)
        else:
            keep = torch.as_tensor(np.asarray(table, dtype=bool), device=probs.device).to(probs.dtype)
        hard = torch.stack([1 - keep, keep], dim=-1)
        gates = hard + (probs - probs.detach())
        first = torch.tensor([0.0, 1.0], device=gates.device).expand(1, self.n_units, 2)
        return torch.cat([first, gates[1:]])

    @torch.no_grad()
    def keep_scores(self) -> np.ndarray:
        """Keep probability per (call, unit), step 0 set to 1: the scores post-processing thresholds."""
        s = self().softmax(-1)[..., 1].double().cpu().numpy()
        s[0] = 1.0
        return s

    # ----- files ----------------------------------------------------------------------------------------------
    def save(self, path, info: dict | None = None):
        """Weights as safetensors; shapes and what the pruner was trained for in the metadata."""
        from safetensors.torch import save
        meta = {"format": PRUNER_FORMAT, "n_calls": self.n_calls, "n_units": self.n_units, "dim": self.dim,
                "hidden": self.hidden, "encoder": self.use_encoder, **(info or {})}
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(path, save(tensors, metadata={"diffprune": json.dumps(meta)}))

    @classmethod
    def load(cls, path) -> tuple["Pruner", dict]:
        """(pruner, info) from a file written by save(); a clear error for anything else."""
        from safetensors import safe_open
        from safetensors.torch import load_file
        p = Path(path)
        if not p.is_file():
            raise DiffpruneError(f"{path}: no such pruner file")
        try:
            with safe_open(str(p), framework="pt") as f:
                text = (f.metadata() or {}).get("diffprune", "{}")
            tensors = load_file(str(p))
        except Exception as e:  # safetensors raises several kinds for a damaged file
            raise DiffpruneError(f"{path}: not a readable safetensors file ({e})") from None
        meta = loads_json(text, f"{path} (pruner metadata)")
        if isinstance(meta, dict) and meta.get("format") == SCORES_FORMAT:  # what --save-pruner writes: the scores
            bad = [k for k in ("n_calls", "n_units", "num_steps") if not _count(meta.get(k))]
            bad += [k for k, kind in (("sampler", str), ("model_hash", str), ("units", list))
                    if not isinstance(meta.get(k), kind)]
            if bad:
                raise DiffpruneError(f"{path}: a damaged pruner file ({', '.join(bad)} missing or wrong); write it "
                                     f"again with --save-pruner")
            return ScoreTable.from_file(tensors, meta, path), meta
        if not isinstance(meta, dict) or meta.get("format") != PRUNER_FORMAT:
            raise DiffpruneError(f"{path} is not a DiP-GO pruner written by diffprune")
        bad = [k for k in ("n_calls", "n_units", "dim", "hidden") if not _count(meta.get(k))]
        bad += [k for k, kind in (("encoder", bool), ("sampler", str), ("model_hash", str), ("units", list))
                if not isinstance(meta.get(k), kind)]
        bad += [] if _count(meta.get("num_steps")) else ["num_steps"]
        queries = tensors.get("queries")
        if bad or queries is None or tuple(queries.shape) != (meta["n_calls"], meta["n_units"], meta["dim"]):
            raise DiffpruneError(f"{path}: a damaged pruner file ({', '.join(bad) or 'queries'} do not describe "
                                 f"its weights); train the pruner again")
        pruner = cls(meta["n_calls"], meta["n_units"], meta["dim"], meta["hidden"], meta["encoder"])
        try:
            pruner.load_state_dict(tensors)
        except RuntimeError as e:
            raise DiffpruneError(f"{path}: weights do not fit the pruner it describes ({e})") from None
        return pruner, meta


class ScoreTable:
    """A trained pruner's keep scores, all that thresholding at another ratio needs: n_calls x n_units numbers
    (kilobytes) instead of the network (one MLP head per cell: 97 MB for a 3 MB model). The network itself, to
    train further, lives in the --state file."""

    def __init__(self, scores):
        self.scores = np.array(scores, dtype=np.float64)
        self.n_calls, self.n_units = self.scores.shape

    def keep_scores(self) -> np.ndarray:
        return self.scores.copy()

    def save(self, path, info: dict | None = None):
        from safetensors.torch import save
        meta = {"format": SCORES_FORMAT, "n_calls": self.n_calls, "n_units": self.n_units, **(info or {})}
        tensors = {"keep_scores": torch.from_numpy(self.scores).contiguous()}
        atomic_write_bytes(path, save(tensors, metadata={"diffprune": json.dumps(meta)}))

    @classmethod
    def from_file(cls, tensors: dict, meta: dict, path) -> "ScoreTable":
        scores = tensors.get("keep_scores")
        if scores is None or tuple(scores.shape) != (meta.get("n_calls"), meta.get("n_units")):
            raise DiffpruneError(f"{path}: the score table is missing or not {meta.get('n_calls')} x "
                                 f"{meta.get('n_units')}; write it again with --save-pruner")
        return cls(scores.numpy())


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2 ** 31


def _he_uniform(shape, fan_in):
    # He initialisation keeps the heads' ReLU features at unit scale (nn.Linear's default shrinks them ~3x per
    # layer): the last layer's gradient grows with their square, so SGD at the paper's lr 0.1 moves the logits
    # within a few hundred iterations instead of tens of thousands
    bound = math.sqrt(6.0 / fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


# ----- training -------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DipGo:
    """A trained pruner with what it was trained for; schedule(ratio) gives a schedule for any target."""
    pruner: Pruner
    graph: UnitGraph
    sampler: str
    num_steps: int
    model_hash: str
    history: list[dict] = dataclasses.field(default_factory=list)
    config: dict = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)  # why its scores may not mean much

    def schedule(self, ratio: float, tol: float = RATIO_TOLERANCE) -> Schedule:
        check_ratio(ratio, "ratio")
        table, got, threshold = table_at_ratio(self.pruner.keep_scores(), self.graph, ratio, tol)
        meta = {"method": "dipgo", "target_ratio": ratio, "pruned_ratio": got, "threshold": threshold,
                "collapse": collapse_report(table, self.graph), "training": self.summary()}
        if self.warnings:
            meta["warnings"] = list(self.warnings)
        return Schedule.from_table(self.graph, table, sampler=self.sampler, num_steps=self.num_steps,
                                   model_hash=self.model_hash, meta=meta)

    def summary(self) -> dict:
        out = {k: v for k, v in self.config.items()}
        if self.history:
            out["first"] = self.history[0]
            out["last"] = self.history[-1]
        return out

    def info(self) -> dict:
        return {"family": self.graph.family, "granularity": self.graph.granularity, "units": self.graph.units,
                "sampler": self.sampler, "num_steps": self.num_steps, "model_hash": self.model_hash,
                "options": self.config}  # how it was trained (guidance, lr, iterations...), for the record

    def save_pruner(self, path):
        """The score table (small; see ScoreTable) with what it was trained for and how the training went."""
        extra = {"training": self.summary(), "warnings": self.warnings}
        ScoreTable(self.pruner.keep_scores()).save(path, {**self.info(), **extra})

    @classmethod
    def load_pruner(cls, path, model, graph: UnitGraph | None = None) -> "DipGo":
        """A trained pruner read back for `model` (checked: same architecture and units)."""
        pruner, meta = Pruner.load(path)
        graph = graph or build_graph(model, meta.get("granularity", "coarse"))
        if meta.get("units") != graph.units or meta.get("model_hash") != architecture_hash(model):
            raise DiffpruneError(f"{path} was trained for another model or granularity "
                                 f"({meta.get('family')}, {meta.get('granularity')}); train one for this model")
        saved = meta.get("warnings") or []
        if not isinstance(saved, list) or not all(isinstance(w, str) for w in saved):
            raise DiffpruneError(f"{path}: a damaged pruner file ('warnings' is not a list of texts)")
        for w in saved:  # said again for every schedule thresholded from it
            warnings.warn(f"{path}: {w}", stacklevel=2)
        return cls(pruner=pruner, graph=graph, sampler=meta["sampler"], num_steps=meta["num_steps"],
                   model_hash=meta["model_hash"], config={"loaded_from": str(path)},
                   warnings=list(meta.get("warnings") or []))


def default_lr(optimizer: str, n_calls: int) -> float:
    """SGD: the released lr 0.1 for DDIM 50 (50 denoiser calls), scaled by (n_calls - 1) / 49. While every gate
    keeps, only the sparsity loss pushes, and it is a mean over the n_calls - 1 gated steps: its gradient on one
    (step, unit) cell shrinks as 1/(n_calls - 1), so at 250 steps lr 0.1 moves each cell 5x slower (measured: 30
    iterations flipped no gate). Scaled, a cell's first update is the same at any step count. AdamW normalises the
    gradient's scale away: 1e-3 at any step count."""
    return 0.1 * max(1, n_calls - 1) / 49 if optimizer == "sgd" else 1e-3


LOSSES = ("ssim", "ms-ssim", "trajectory")
GATES = ("argmax", "target")


@dataclasses.dataclass
class DipGoOptions:
    """How a pruner is trained (what train_pruner's rollout arguments do not say). The defaults are the paper's
    recipe: loss "ssim", gates "argmax" with the sparsity loss, SGD at default_lr.

    loss: what the consistency compares with the dense rollout from the same noise and condition:
      ssim        1 - SSIM of the final images (the paper);
      ms-ssim     1 - the mean SSIM of the final images at full, half and quarter resolution (average pooling; a
                  simple multi-scale SSIM, not Wang et al.'s product of contrast-structure terms);
      trajectory  per-step consistency, as Learning-to-Cache compares the gated and full trajectories: the
                  weighted mean of 1 - SSIM between the denoiser inputs x_t of the gated and the dense rollouts at
                  every call, and the final images, each weighted by its signal share (alphas_cumprod at t, 1 for
                  the final image; 1 - sigma for flow models), so the low-noise end, where the image's detail is
                  decided, weighs most.
    gates: argmax  each cell's own argmax, pushed towards the target by the sparsity loss (alpha), switched off
                   while the hard schedule prunes more than the target (the paper);
           target  the hard gates are the schedule the scores give at the target ratio (ratios.table_at_ratio),
                   so every training rollout runs at exactly the cost of the schedule it will return; no sparsity
                   loss (the ratio is held by construction), the consistency orders the cells.
    state_path / checkpoint_every / checkpoint_minutes: resumable training state (see train_pruner)."""
    iterations: int = 200
    batch_size: int = 1
    optimizer: str | None = None  # None: sgd (the paper's), or the recipe's (recipes.py)
    lr: float | None = None
    momentum: float = 0.0
    weight_decay: float = 1e-4
    warmup: int = 10
    grad_clip: float = 1.0
    alpha: float = 1.0
    dim: int = 512
    hidden: int = 128
    encoder: bool = True
    checkpoint: bool = True
    loss: str = "ssim"
    gates: str = "argmax"
    state_path: object = None
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 5.0
    max_minutes: float | None = None  # stop training after this long (the result says where: config stopped_at)

    @classmethod
    def of(cls, options: "DipGoOptions | None" = None, **changes) -> "DipGoOptions":
        """`options` (default: the paper's) with `changes`; an unknown name is a clear error, not a TypeError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise DiffpruneError(f"unknown DiP-GO option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(options or cls(), **changes)

    def check(self) -> "DipGoOptions":
        if self.optimizer is None:
            self.optimizer = "sgd"
        if self.optimizer not in ("sgd", "adamw"):
            raise DiffpruneError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.loss not in LOSSES:
            raise DiffpruneError(f"unknown DiP-GO loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.gates not in GATES:
            raise DiffpruneError(f"unknown DiP-GO gates {self.gates!r}; choose one of {', '.join(GATES)}")
        for name in ("iterations", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if (v is not None or name != "checkpoint_every") and (isinstance(v, bool) or not isinstance(v, int)
                                                                 or v < 1):
                raise DiffpruneError(f"{name} must be a positive integer, got {v!r}")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0):
            raise DiffpruneError(f"max_minutes must be a positive number, got {self.max_minutes!r}")
        if not (isinstance(self.checkpoint_minutes, (int, float)) and self.checkpoint_minutes > 0):
            raise DiffpruneError(f"checkpoint_minutes must be a positive number, got {self.checkpoint_minutes!r}")
        return self
