"""Timestep grids: which timesteps a rollout visits, and what the sampler does at each.

A rollout normally visits the sampler's own grid of `num_steps` timesteps and calls the denoiser at every one. A
grid changes both: `timesteps` lists the timesteps visited (descending; a base-grid timestep left out is *dropped*:
the sampler goes straight from the previous visited timestep to the next), and `reuse` marks visits at which the
sampler steps with the previous prediction instead of calling the denoiser (*reused*). Fewer sampler steps, whole-step
reuse and a searched grid are all grids; a schedule (schedule/schedule.py) carries one beside its keep table.

Reuse and drop are different rollouts in general, but for DDIM with eta 0 (no x0 clipping) and flow-matching Euler
(a held velocity: x moves by (sigma_next - sigma) * v, which adds up over consecutive steps) a run of reused
steps is the same as one larger step: DDIM's predicted x0 does not change while the noise prediction is held, so the
intermediate timesteps can be left out (`fold_reason` says where that holds). Folding saves the sampler update, the
CFG arithmetic and the Python around every reused step.

diffusers' DDIMScheduler assumes a uniform grid (prev = t - 1000 // steps), so a non-uniform DDIM grid runs on
GridDDIMScheduler, the same formulas stepping to the next listed timestep. Schedulers that take custom timesteps
(DDPM, DPM-Solver++, LCM) get them through set_timesteps(timesteps=...); PLMS only runs its own uniform grids.
"""
from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import torch

from .errors import DiffpruneError


@dataclasses.dataclass(frozen=True)
class Grid:
    timesteps: tuple | None = None   # visited timesteps, descending; None = the sampler's own num_steps grid
    reuse: tuple | None = None       # per visit: True = step with the previous prediction, no denoiser call

    def __post_init__(self):
        if self.timesteps is not None:
            object.__setattr__(self, "timesteps", tuple(_plain(t) for t in self.timesteps))
        if self.reuse is not None:
            reuse = tuple(bool(r) for r in self.reuse)
            if reuse and reuse[0]:
                raise DiffpruneError("the first visit of a grid cannot reuse: there is no prediction before it")
            object.__setattr__(self, "reuse", reuse)
        if self.timesteps is not None and self.reuse is not None and len(self.timesteps) != len(self.reuse):
            raise DiffpruneError(f"a grid has {len(self.timesteps)} timesteps but {len(self.reuse)} reuse flags")

    @property
    def is_plain(self) -> bool:
        return self.timesteps is None and not any(self.reuse or ())

    def reuse_flags(self, n_visits: int) -> tuple:
        if self.reuse is None:
            return (False,) * n_visits
        if len(self.reuse) != n_visits:
            raise DiffpruneError(f"the grid's reuse flags cover {len(self.reuse)} visits but the sampler visits "
                                 f"{n_visits} timesteps")
        return self.reuse


class _GridDDIM:
    """Mixed into a DDIMScheduler subclass: DDIM over an explicit list of timesteps (same formulas as diffusers'
    DDIMScheduler.step, with the previous timestep read from the list instead of t - 1000 // steps)."""

    def set_grid(self, timesteps, device=None):
        ts = np.asarray(timesteps, dtype=np.int64)
        self.num_inference_steps = len(ts)
        self.timesteps = torch.from_numpy(ts.copy()).to(device)
        self._prev = {int(a): int(b) for a, b in zip(ts, [*ts[1:].tolist(), -1])}

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
             generator=None, variance_noise=None, return_dict: bool = True):
        t = int(timestep)
        prev_t = self._prev[t]
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        elif kind == "v_prediction":
            x0 = (alpha_prod_t ** 0.5) * sample - (beta_prod_t ** 0.5) * model_output
            eps = (alpha_prod_t ** 0.5) * model_output + (beta_prod_t ** 0.5) * sample
        else:
            raise DiffpruneError(f"unsupported prediction_type {kind!r}")
        if self.config.thresholding:
            x0 = self._threshold_sample(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        variance = self._get_variance(t, prev_t)
        std_dev_t = eta * variance ** (0.5)
        if use_clipped_model_output:
            eps = (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** (0.5) * eps
        prev_sample = alpha_prod_t_prev ** (0.5) * x0 + direction
        if eta > 0:
            if variance_noise is None:
                from diffusers.utils.torch_utils import randn_tensor
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return prev_sample, x0
        from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)


@functools.cache
def _grid_ddim_class():
    import diffusers  # imported when first needed: diffusers takes seconds to import
    return type("GridDDIMScheduler", (_GridDDIM, diffusers.DDIMScheduler), {"__module__": __name__})


def base_timesteps(sched, num_steps: int) -> list:
    """The timesteps `sched` visits in its own `num_steps`-step grid (PLMS: one repeated)."""
    s = copy.deepcopy(sched)
    s.set_timesteps(num_steps)
    return [_plain(t) for t in s.timesteps.tolist()]


def _plain(t):
    return int(t) if float(t).is_integer() else float(t)


def set_grid(sched, num_steps: int, timesteps=None, device=None):
    """Set `sched` (a fresh copy, may be replaced) to visit `timesteps` (None: its own num_steps grid). Returns
    the scheduler to use."""
    import diffusers

    if timesteps is None:
        try:
            sched.set_timesteps(num_steps, device=device)
        except ValueError as e:  # e.g. more steps than training timesteps, LCM beyond its original steps
            raise DiffpruneError(f"{type(sched).__name__} cannot run {num_steps} steps: {e}") from e
        return sched
    ts = list(timesteps)
    if not ts:
        raise DiffpruneError("a grid needs at least one timestep")
    n_train = sched.config.num_train_timesteps
    if isinstance(sched, diffusers.FlowMatchEulerDiscreteScheduler):
        return _set_flow_grid(sched, ts, n_train, device)
    if any(not (0 <= t < n_train) for t in ts):
        raise DiffpruneError(f"grid timesteps must lie in [0, {n_train}); got {min(ts)} to {max(ts)}")
    if isinstance(sched, diffusers.PNDMScheduler):
        # PLMS's multistep update assumes a uniform grid: only its own grids (of any step count) can run
        k = len(ts) - 1 if len(ts) > 1 else 1
        if base_timesteps(sched, k) != ts:
            raise DiffpruneError("plms runs only its own uniform grids (a fewer-steps schedule), not a grid with "
                                 "dropped steps; use reused steps instead, or the ddim / dpm-solver++ sampler")
        sched.set_timesteps(k, device=device)
        return sched
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise DiffpruneError("grid timesteps must be strictly descending")
    if isinstance(sched, diffusers.DDIMScheduler):
        grid_sched = _grid_ddim_class().from_config(sched.config)
        grid_sched.set_grid(ts, device)
        return grid_sched
    try:
        sched.set_timesteps(timesteps=ts, device=device)
    except (TypeError, ValueError) as e:
        raise DiffpruneError(f"{type(sched).__name__} cannot run a custom timestep grid ({e}); use the ddim, ddpm "
                             f"or dpm-solver++ sampler") from e
    return sched


def _set_flow_grid(sched, ts, n_train, device):
    """Flow-matching Euler over visited timesteps t = sigma * n_train, already shifted (a flow grid is read off the
    scheduler's own shifted grid, and set_timesteps would shift it again): the sigmas are set directly, the last
    step going to sigma 0 as diffusers' own grid does."""
    if any(not (0 < t <= n_train) for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
        raise DiffpruneError(f"flow grid timesteps must be strictly descending in (0, {n_train}]")
    t = torch.tensor(ts, dtype=torch.float32)
    sched.num_inference_steps = len(ts)
    sched.timesteps = t.to(device)
    sched.sigmas = torch.cat([t / n_train, torch.zeros(1)]).to(device)
    sched._step_index, sched._begin_index = None, None
    return sched


def fold_reason(sched, eta: float = 0.0) -> str | None:
    """None when reusing the prediction over consecutive steps of `sched` equals one larger step (so a reuse run
    can be folded into a drop); else why not."""
    import diffusers

    name = type(sched).__name__
    if isinstance(sched, diffusers.DDIMScheduler):
        if eta:
            return "DDIM with eta > 0 adds fresh noise at every step"
        if sched.config.clip_sample or sched.config.thresholding:
            return ("this DDIM clips (or thresholds) the predicted x0 at every step, so a held prediction moves x0 "
                    "differently from one larger step (use --sampler ddim on a scheduler without clip_sample, or "
                    "fold(..., approximate=True))")
        if sched.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            return f"prediction type {sched.config.prediction_type} is not DDIM's"
        if sched.config.prediction_type != "epsilon":
            return (f"a held {sched.config.prediction_type} prediction does not keep x0 fixed across DDIM steps "
                    f"(only an epsilon prediction does)")
        return None
    if isinstance(sched, diffusers.FlowMatchEulerDiscreteScheduler):
        if sched.config.stochastic_sampling:
            return "stochastic flow-matching sampling adds noise at every step"
        return None  # x += (sigma_next - sigma) * v: a held velocity makes consecutive steps one step
    if isinstance(sched, diffusers.PNDMScheduler) or isinstance(sched, diffusers.DPMSolverMultistepScheduler):
        return (f"{name} is a multistep sampler: it combines the last predictions, so a reused step and a larger "
                f"step are two different rollouts")
    return (f"{name} adds noise at every step or combines several predictions; only DDIM (eta 0) and flow-matching "
            f"Euler fold exactly")
