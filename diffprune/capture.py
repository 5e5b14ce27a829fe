"""A whole rollout, captured: one CUDA graph holds every denoiser call, the sampler's arithmetic and the CFG mixing.

On a fast GPU eager PyTorch is launch-bound, and even a rollout whose denoiser calls are captured one by one pays
the sampler update, the guidance arithmetic and the Python around each step (about 0.12 ms a step on DiT-XL/2: 24 ms
of a 237 ms rollout for 200 reused steps). A static schedule fixes every decision in advance, so the whole loop can
be recorded once and replayed as one graph: a replay runs no Python at all.

How: the rollout is planned exactly as sampling.sample() plans it (same scheduler, grid, conditioning and loop,
sampling.run_loop), with the scheduler's timesteps kept on the CPU so that it never reads GPU memory from Python.
The schedule runtime is applied while the loop is recorded (its per-unit decisions are plain Python, read from the
table) and removed after: the graph has baked them in. The initial noise and the conditioning live in static
buffers; a call copies new values into them and replays.

mode "graph" captures (CUDA only); mode "eager" runs the same planned loop without capture, on any device: it is how
the captured path is checked on a CPU, and what the graph must reproduce. Samplers that draw fresh noise at every
step (ddpm, lcm, DDIM with eta > 0) are refused: their noise would be frozen into the graph.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from .errors import DiffpruneError
from .sampling import (canonical_sampler, finish, make_noise, make_scheduler, notify_rollout_start, plan_rollout,
                       run_loop)
from .models import build_graph
from .schedule import apply_schedule
from .util import denoiser_of, positive_int

MODES = ("graph", "eager")
STOCHASTIC = ("ddpm", "lcm")


def capture_rollout(model_or_pipeline, schedule=None, *, steps: int | None = None, sampler: str | None = None,
                    batch: int = 1, guidance_scale: float = 1.0, labels=None, cond: dict | None = None,
                    uncond: dict | None = None, height: int | None = None, width: int | None = None,
                    scheduler=None, strict: bool = True, mode: str | None = None, graph=None,
                    compile_units: bool = False) -> "CapturedRollout":
    """A callable that runs one whole rollout of `model_or_pipeline` (a denoiser or a pipeline, whose scheduler
    config is used) under `schedule` (None: dense): `rollout(noise)` or `rollout(seed=0)` returns the final sample
    (pixel models: images in [-1, 1]; latent models: latents), exactly what sampling.sample() returns for the same
    arguments. steps / sampler default to the schedule's (else 50 / ddim). labels / cond / uncond: the
    conditioning, as in sample(), fixed in shape; a call may pass new labels of the same shape. mode: "graph" (the
    default on CUDA: one CUDA graph, captured here) or "eager" (the same loop without capture; any device).
    graph: the model's UnitGraph at the schedule's granularity (built when omitted). compile_units: compile each
    unit's forward with torch.compile first (regional compilation: the schedule's per-step decisions stay in
    Python around the compiled units, so the graph records fused kernels; costs a compilation of seconds to a
    couple of minutes; bench/compile_speed.py measures what it buys)."""
    return CapturedRollout(model_or_pipeline, schedule, steps=steps, sampler=sampler, batch=batch,
                           guidance_scale=guidance_scale, labels=labels, cond=cond, uncond=uncond, height=height,
                           width=width, scheduler=scheduler, strict=strict, mode=mode, graph=graph,
                           compile_units=compile_units)


class CapturedRollout:
    def __init__(self, model_or_pipeline, schedule=None, *, steps=None, sampler=None, batch=1, guidance_scale=1.0,
                 labels=None, cond=None, uncond=None, height=None, width=None, scheduler=None, strict=True,
                 mode=None, graph=None, compile_units=False):
        model = denoiser_of(model_or_pipeline)
        pipe = model_or_pipeline if model is not model_or_pipeline else None
        self.model, self.schedule, self.strict = model, schedule, strict
        device = next(model.parameters()).device
        mode = mode or ("graph" if device.type == "cuda" else "eager")
        if mode not in MODES:
            raise DiffpruneError(f"unknown capture mode {mode!r}; choose from {', '.join(MODES)}")
        steps = steps or (schedule.num_steps if schedule is not None else 50)
        sampler = sampler or (schedule.sampler if schedule is not None else "ddim")
        positive_int(steps, "steps")
        if schedule is not None:
            schedule.check(sampler=sampler, num_steps=steps)
        stochastic = (canonical_sampler(sampler) in STOCHASTIC if scheduler is None
                      else type(scheduler).__name__ in ("DDPMScheduler", "LCMScheduler"))
        if mode == "graph" and stochastic:
            raise DiffpruneError(f"the {sampler} sampler draws fresh noise at every step, which a captured graph "
                                 f"would freeze; capture ddim, plms or dpm-solver++ rollouts, or run eagerly")
        if mode == "graph" and device.type != "cuda":
            raise DiffpruneError("a captured rollout (CUDA graph) needs the model on a CUDA device; on a CPU use "
                                 "mode='eager' (the same loop without capture) or plain sampling")
        self.mode = mode
        if graph is None and (schedule is not None or compile_units):
            graph = build_graph(model, schedule.granularity if schedule is not None else "coarse")
        self.graph_units = graph
        # the compiled forwards live as long as the rollout: a captured graph replays their kernels
        self._compiled = ({u: torch.compile(model.get_submodule(u).forward) for u in graph.units}
                          if compile_units else {})
        if scheduler is None and pipe is not None:
            scheduler = make_scheduler(sampler, dict(pipe.scheduler.config))
        self.steps, self.sampler = steps, sampler
        self.plan = plan_rollout(model, steps, sampler, labels=labels, batch=batch, cond=cond, uncond=uncond,
                                 guidance_scale=guidance_scale, height=height, width=width, scheduler=scheduler,
                                 grid=schedule.grid if schedule is not None else None, timestep_device=None)
        self._template = self.plan.scheduler  # copied before every run: schedulers keep state
        self.noise = make_noise(model, self.plan.batch, 0, height, width).clone()
        self._t = self._template.timesteps.to(device)  # the model's timestep inputs, read by index in the graph
        self.graph = None
        self.out = None
        if mode == "graph":
            self._capture()

    # ----- the loop ------------------------------------------------------------------------------------------
    @property
    def n_calls(self) -> int:
        return self.plan.n_calls

    def _schedule_ctx(self):
        if self.schedule is None:
            return contextlib.nullcontext()
        return apply_schedule(self.model, self.schedule, graph=self.graph_units, strict=self.strict)

    @contextlib.contextmanager
    def _units_compiled(self):
        """The compiled unit forwards installed as instance attributes (the schedule runtime's hooks, applied
        inside, wrap them); whatever was there before is put back."""
        saved = {}
        try:
            for name, fn in self._compiled.items():
                mod = self.model.get_submodule(name)
                saved[name] = mod.__dict__.get("forward")
                mod.forward = fn
            yield
        finally:
            for name, before in saved.items():
                mod = self.model.get_submodule(name)
                if before is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.forward = before

    def _loop(self) -> torch.Tensor:
        plan, model = self.plan, self.model
        sched = copy.deepcopy(self._template)

        def predict(i, x_in, t):
            t_in = self._t[i].expand(x_in.shape[0])
            return plan.adapter.predict_noise(model, x_in.to(plan.dtype), t_in, plan.model_cond).float()

        notify_rollout_start(model, plan.n_calls)
        x = self.noise * sched.init_noise_sigma
        x = run_loop(sched, x, predict, reuse=plan.reuse, guidance_scale=plan.guidance_scale,
                     step_kwargs=plan.step_kwargs)
        return finish(model, x)

    def _capture(self):
        with torch.inference_mode(), self._units_compiled(), self._schedule_ctx():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream (cuBLAS/cuDNN set-up, lazy caches)
                self._loop()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._loop()
        torch.cuda.synchronize()

    # ----- calls ---------------------------------------------------------------------------------------------
    def replay(self) -> torch.Tensor:
        """Run the rollout on the current buffers; returns the output buffer itself (overwritten by the next run;
        no copy, no synchronisation: what a benchmark times)."""
        if self.mode == "graph":
            self.graph.replay()
            return self.out
        with torch.inference_mode(), self._units_compiled(), self._schedule_ctx():
            self.out = self._loop()
        return self.out

    def __call__(self, noise: torch.Tensor | None = None, *, seed: int | None = None, labels=None) -> torch.Tensor:
        """The final sample of a rollout from `noise` (or the noise of `seed`; default: the last noise used);
        labels: new class labels of the same shape. Returns a fresh tensor."""
        if noise is not None and seed is not None:
            raise DiffpruneError("give noise or seed, not both")
        if seed is not None:
            noise = make_noise(self.model, self.plan.batch, seed, self.noise.shape[-2], self.noise.shape[-1])
        if noise is not None:
            if not torch.is_tensor(noise) or tuple(noise.shape) != tuple(self.noise.shape):
                raise DiffpruneError(f"noise must have the captured shape {tuple(self.noise.shape)}, got "
                                     f"{tuple(getattr(noise, 'shape', ()))}")
            self.noise.copy_(noise)
        if labels is not None:
            self._set_labels(labels)
        return self.replay().clone()

    def _set_labels(self, labels):
        buf = self.plan.model_cond.get("class_labels")
        if buf is None:
            raise DiffpruneError("this rollout is not class-conditional: labels do not apply")
        labels = torch.as_tensor(labels)
        n = self.plan.batch
        if tuple(labels.shape) != (n,):
            raise DiffpruneError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        buf[-n:].copy_(labels.to(buf.device, buf.dtype))  # under guidance the first half is the null class
