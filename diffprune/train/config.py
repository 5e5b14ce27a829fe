"""What defines a training run (TrainConfig and its recipes) and the error an interrupted run ends with."""
from __future__ import annotations

import dataclasses
import math

from ..errors import DiffpruneError

NUM_TRAIN_TIMESTEPS = 1000


class TrainingInterrupted(DiffpruneError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; running the same command resumes it."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run. `batch_size` is the global batch (split over processes)."""
    steps: int = 12000
    batch_size: int = 256
    lr: float = 3e-4
    warmup: int = 0                     # linear lr warm-up steps (0 = none)
    optimizer: str = "adamw"            # "adamw" | "adam"
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max global grad norm; 0 = no clipping
    ema_decay: float | None = 0.999    # None: max(0, min(0.9999, 1 - 10 / steps)), set by validate()
    ema_warmup: bool = True             # decay min(ema_decay, (1+k)/(10+k)); False = fixed decay from step 1
    label_dropout: float = 0.1          # probability of replacing a label by the null class (CFG)
    antithetic: bool = True             # timesteps t and 999-t in pairs
    loss_reduction: str = "mean"        # "mean": per-pixel MSE; "sum": summed over pixels, mean over the batch
    distill_weight: float = 0.7         # with a teacher: w*|s-teacher|^2 + (1-w)*|s-eps|^2
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 10.0    # also checkpoint after this much training time since the last one
    log_every: int = 50
    sample_every: int = 0               # sample grid every N steps (0 = only at the end)
    seed: int = 0
    mixed_precision: str = "bf16"       # "bf16" | "no"; bf16 autocast only on CUDA
    device: str = "auto"                # "auto" | "cpu" | "cuda" (under `accelerate launch`, accelerate decides)
    max_minutes: float | None = None    # stop cleanly (checkpoint + model snapshot) after this much wall time
    stop_at: int | None = None          # stop as if interrupted after this step (train in slices)
    grid: bool = True                   # write a sample grid PNG with the final model
    plot: bool = True                   # write the loss-curve PNG
    grid_steps: int = 50                # DDIM steps of the grid
    grid_guidance: float = 2.0
    meta: dict = dataclasses.field(default_factory=dict)   # free-form, saved in train_config.json

    # fields that may change between an interrupted run and its resumption; all others must match
    RUN_CONTROL = ("steps", "checkpoint_every", "checkpoint_minutes", "log_every", "sample_every", "device",
                   "max_minutes", "stop_at", "grid", "grid_steps", "grid_guidance", "plot", "meta")

    @classmethod
    def reference(cls, family: str = "unet2d", **overrides) -> "TrainConfig":
        """From-scratch recipe of the Fashion-MNIST reference models (~8 min on one H100 at batch 256).
        AdamW with linear warm-up (transformers need it), EMA 0.999 with the usual (1+k)/(10+k) warm-up:
        a ~1K-step average suits runs of 5-15K steps."""
        base = dict(steps=12000, batch_size=256, optimizer="adamw", weight_decay=0.01, grad_clip=1.0,
                    ema_decay=0.999, ema_warmup=True, label_dropout=0.1, antithetic=True, loss_reduction="mean")
        if family == "dit":
            base.update(lr=3e-4, warmup=500)
        else:
            base.update(lr=5e-4, warmup=250)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def finetune(cls, **overrides) -> "TrainConfig":
        """Diff-Pruning's fine-tuning recipe: Adam (0.9, 0.999, eps 1e-8, wd 0), constant lr 2e-4, no warm-up,
        grad-clip 1.0, EMA from step 1, antithetic timesteps, MSE summed over pixels (batch mean).

        The paper's EMA decay 0.9999 belongs to its 100K-step fine-tune: an average over the last ~10K steps, a
        tenth of the run. Kept fixed on a short run it would leave the EMA model mostly the un-fine-tuned pruned
        weights (0.9999 ** 1200 = 0.89 after 1200 steps), so unless ema_decay is given, the decay keeps that
        horizon at a tenth of the run: min(0.9999, 1 - 10 / steps), fixed when the config is validated."""
        base = dict(batch_size=128, lr=2e-4, warmup=0, optimizer="adam", betas=(0.9, 0.999), eps=1e-8,
                    weight_decay=0.0, grad_clip=1.0, ema_decay=None, ema_warmup=False, antithetic=True,
                    loss_reduction="sum")
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise DiffpruneError(f"unknown training settings {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def validate(self) -> "TrainConfig":
        def pos_int(name, allow_zero=False, allow_none=False):
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
                kind = "a non-negative" if allow_zero else "a positive"
                raise DiffpruneError(f"{_flag(name)} must be {kind} integer, got {v!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "grid_steps"):
            pos_int(name)
        for name in ("warmup", "sample_every", "seed"):
            pos_int(name, allow_zero=True)
        pos_int("stop_at", allow_none=True)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DiffpruneError(f"--lr must be a positive number, got {self.lr}")
        if self.ema_decay is None:  # the fine-tune recipe's default: an average over the last tenth of the run
            self.ema_decay = max(0.0, min(0.9999, 1 - 10 / self.steps))
        if not 0.0 <= self.ema_decay < 1.0:
            raise DiffpruneError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise DiffpruneError(f"--label-dropout must lie in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise DiffpruneError(f"--distill-weight must lie in [0, 1], got {self.distill_weight}")
        if self.grad_clip < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise DiffpruneError("grad_clip and weight_decay must be >= 0 and eps > 0")
        if not (isinstance(self.checkpoint_minutes, (int, float)) and self.checkpoint_minutes > 0):
            raise DiffpruneError(f"--checkpoint-minutes must be a positive number, got {self.checkpoint_minutes!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise DiffpruneError(f"--max-minutes must be a positive number, got {self.max_minutes}")
        if self.grid_guidance < 1.0:
            raise DiffpruneError(f"grid_guidance must be >= 1, got {self.grid_guidance}")
        for name, allowed in (("optimizer", ("adamw", "adam")), ("loss_reduction", ("mean", "sum")),
                              ("mixed_precision", ("bf16", "no")), ("device", ("auto", "cpu", "cuda"))):
            if getattr(self, name) not in allowed:
                raise DiffpruneError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        return self

    def recipe_differences(self, other: "TrainConfig") -> list[str]:
        """Settings (outside RUN_CONTROL) on which two configs disagree."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if k not in self.RUN_CONTROL and a[k] != b[k]]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")

