"""Latency and memory of a denoiser: one call, and a whole sampler rollout, dense or under a schedule.

On an H100, eager PyTorch is launch-bound: the GPU mostly waits for Python to issue kernels, so eager timings
measure the CPU and make skipped blocks look better or worse than they are. The headline numbers are therefore
taken in a captured mode, CUDA graphs, with eager numbers beside them.

Modes
- "eager":  plain PyTorch; a schedule runs through the schedule runtime (diffprune.schedule.apply_schedule).
- "graph":  CUDA only. The denoiser call is captured once per distinct step pattern of the schedule (a dense
            rollout has one pattern) on static input/output buffers, and the sampler loop replays the graphs;
            the scheduler steps and CFG arithmetic run eagerly around them, as they would in a pipeline.
- "static": the "graph" code path without capture (static buffers, per-pattern dispatch, run eagerly). Any
            device; it is how the graph path is tested on a CPU.
- "capture": the whole rollout (every denoiser call, the sampler arithmetic and the CFG mixing) as one CUDA graph
            (diffprune.capture); a replay runs no Python, so reused steps cost only their sampler arithmetic. On a
            CPU the same loop runs without capture.

Ideal speedups are printed in two conventions: FLOPs that run (attention score/value products counted:
ideal_speedup) and torch-pruning's MACs (the papers' convention, which leaves attention out: macs_ideal_speedup).

A replayed graph runs no Python, so the unit caches of a schedule cannot be Python references that change from
step to step: graphs captured for different patterns must read and write the same memory. The schedule runtime's
static mode keeps every unit output in a buffer allocated at step 0 and updated in place, and its seek() selects
the step (hence the pattern) that the next call runs as, which is all that capture needs.

Timing: CUDA events around the region (synchronised after each repeat), after warm-up; on a CPU, wall time
under torch.inference_mode. Results are medians with p10/p90 over the repeats. Peak memory: on CUDA
torch.cuda.max_memory_allocated since the start of the measurement; on a CPU the process's peak resident set
size (ru_maxrss, a high-water mark of the whole process that cannot be reset).

Why one room of ~460 lines: the four modes share the inputs, the per-pattern dispatch and the report they are
compared in.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import resource
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from .capture import CapturedRollout
from .errors import DiffpruneError
from .grid import set_grid
from .models import build_graph, get_adapter
from .sampling import (concat_conditions, finish, make_scheduler, notify_rollout_start, plan_rollout,
                       run_loop)
from .schedule import apply_schedule
from .util import denoiser_of, positive_int

MODES = ("eager", "graph", "static", "capture")


# ----- arguments ---------------------------------------------------------------------------------
def check_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise DiffpruneError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "graph" and device.type != "cuda":
        raise DiffpruneError("mode 'graph' captures CUDA graphs and needs a CUDA device; use eager (or static) "
                             "on a CPU")
    # "capture" on a CPU runs the captured path's loop without capture (capture.py's eager mode)
    return mode


# ----- timing and memory -------------------------------------------------------------------------
def summarize(samples_ms) -> dict:
    a = np.asarray(samples_ms, dtype=float)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90)), "mean_ms": float(a.mean()), "min_ms": float(a.min()),
            "max_ms": float(a.max()), "n": int(a.size)}


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn, after `warmup` untimed calls."""
    positive_int(repeats, "repeats")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise DiffpruneError(f"warmup must be a non-negative integer, got {warmup!r}")
    for _ in range(warmup):
        fn()
    out = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_mem_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_mem_bytes": int(rss if sys.platform == "darwin" else rss * 1024), "peak_mem_kind": "process_max_rss"}


def _release(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----- inputs --------------------------------------------------------------------------------------
def denoiser_inputs(model, batch: int, cfg: bool, height=None, width=None):
    """(x, cond) for one denoiser call at `batch` samples: x has the denoiser batch (2*batch with CFG, the
    doubled [uncond; cond] batch one pipeline call runs) and cond the matching conditioning."""
    positive_int(batch, "batch")
    p = next(model.parameters())
    x, _, _ = get_adapter(model).example_inputs(model, batch=batch, height=height, width=width, device=p.device,
                                                dtype=p.dtype)
    cond, uncond = _conditions(model, batch, cfg)
    if not cfg:
        return x, cond
    return torch.cat([x, x]), concat_conditions(uncond, cond)


def _conditions(model, batch: int, cfg: bool):
    """(cond, uncond) of example inputs at `batch` samples (uncond None without cfg)."""
    adapter = get_adapter(model)
    p = next(model.parameters())
    _, _, cond = adapter.example_inputs(model, batch=batch, device=p.device, dtype=p.dtype)
    if not cfg:
        return cond, None
    # text models: any embedding of the right shape stands for the empty prompt (values do not change timings)
    uncond = cond if adapter.conditioning == "text" else adapter.null_condition(model, batch, device=p.device)
    if not cond or not uncond:
        raise DiffpruneError(f"{adapter.family} model without conditioning: classifier-free guidance (--cfg) "
                             "does not apply to it")
    return cond, uncond


def estimate_seconds(model, *, calls: int, batch: int, guided: bool) -> float:
    """Seconds that `calls` denoiser calls at `batch` samples (doubled under guidance) should take on this
    machine, from the median of three calls timed after two warm-up calls (the first calls run slow): said before
    a long job starts, not after."""
    r = time_denoiser_call(model, batch, cfg=guided, repeats=3, warmup=2)
    return calls * r["median_ms"] / 1e3


def captured_rollout_ms(model, schedule, *, graph, sampler: str, steps: int, guidance_scale: float) -> float:
    """Median ms of one rollout at batch 1 (CFG when guidance_scale > 1) captured as one CUDA graph: what
    `search --method auto --latency-ms` holds each candidate to (schedule.auto_search's timer)."""
    return float(time_rollout(model, schedule, steps=steps, sampler=sampler, batch=1, cfg=guidance_scale > 1,
                              guidance_scale=guidance_scale, mode="capture", graph=graph)["median_ms"])


def macs_summary(graph, schedule, n_calls: int, run_graph=None) -> dict:
    """Dense (n_calls calls) and scheduled MACs of a rollout (cascade applied) and the ideal speedups they imply:
    macs_ideal_speedup in torch-pruning's convention (the papers'; `graph`), ideal_speedup with the attention
    products counted (the FLOPs that run; `run_graph`, a graph built with include_attention=True)."""
    dense = graph.total_macs * n_calls
    sched = dense if schedule is None else schedule.macs(graph)
    out = {"dense_macs": dense, "schedule_macs": sched, "macs_reduction": 1 - sched / dense,
           "macs_ideal_speedup": dense / sched}
    if run_graph is not None:
        run_dense = run_graph.total_macs * n_calls
        run_sched = run_dense if schedule is None else schedule.macs(run_graph)
        out.update({"dense_run_macs": run_dense, "schedule_run_macs": run_sched,
                    "ideal_speedup": run_dense / run_sched})
    return out


# ----- one denoiser call on static buffers, replayable ---------------------------------------------
class _StaticCall:
    """A denoiser call on static input and output buffers, for each step pattern of a schedule.

    With a schedule runtime in static mode (fixed cache buffers updated in place), pattern k is selected by
    seeking the runtime to `steps[k]`, a step that uses it; the first pattern must be step 0's, whose eager run
    allocates every cache buffer before anything is captured. In "graph" mode each pattern is warmed up on a side
    stream and captured into a CUDA graph; the graphs share one memory pool (they never run concurrently, and the
    caches they share live outside it). In "static" mode run() calls the denoiser eagerly on the same buffers."""

    def __init__(self, model, x, t_value, cond, mode: str, runtime=None, steps: list[int] | None = None,
                 t_dtype=torch.long):
        self.model, self.mode, self.runtime = model, mode, runtime
        self.adapter = get_adapter(model)
        self.steps = steps if runtime is not None else [None]
        self.x = x.clone()
        self.t = torch.full((x.shape[0],), t_value, dtype=t_dtype, device=x.device)
        self.cond = cond
        self.graphs: list = []
        with torch.inference_mode():
            self.out = self._forward(0).clone()  # step 0: fills every cache buffer
        if mode == "graph":
            self._capture()

    def _forward(self, k):
        if self.runtime is not None:
            self.runtime.seek(self.steps[k])
        return self.adapter.predict_noise(self.model, self.x, self.t, self.cond)

    def _body(self, k):
        self.out.copy_(self._forward(k))

    def _capture(self):
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        with torch.inference_mode():
            for k in range(len(self.steps)):
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
                    for _ in range(2):
                        self._body(k)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._body(k)
                self.graphs.append(g)
        torch.cuda.synchronize()

    def run(self, k: int = 0):
        if self.mode == "graph":
            self.graphs[k].replay()
        else:
            self._body(k)
        return self.out


# ----- public measurements -------------------------------------------------------------------------
def _context(model, mode) -> dict:
    p = next(model.parameters())
    info = {"mode": mode, "device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""),
            "model_class": type(model).__name__, "torch": torch.__version__}
    if p.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(p.device)
    return info


def time_denoiser_call(model, batch: int = 1, *, cfg: bool = False, height: int | None = None,
                       width: int | None = None, mode: str = "eager", repeats: int = 30, warmup: int = 5) -> dict:
    """Latency of one dense denoiser call at `batch` samples (the denoiser sees 2*batch with cfg).
    Returns median/p10/p90/mean/min/max ms, the peak memory and the settings."""
    model = denoiser_of(model)
    device = next(model.parameters()).device
    check_mode(mode, device)
    positive_int(repeats, "repeats")
    x, cond = denoiser_inputs(model, batch, cfg, height, width)
    reset_peak_memory(device)
    with torch.inference_mode():
        if mode == "eager":
            adapter = get_adapter(model)
            t = torch.full((x.shape[0],), 500, dtype=torch.long, device=device)
            samples = measure(lambda: adapter.predict_noise(model, x, t, cond), device, repeats, warmup)
        else:
            call = _StaticCall(model, x, 500, cond, mode)
            samples = measure(call.run, device, repeats, warmup)
    result = {**_context(model, mode), "what": "call", "batch": batch, "cfg": bool(cfg),
              "denoiser_batch": int(x.shape[0]), "input_shape": list(x.shape), **summarize(samples),
              **peak_memory(device)}
    if mode != "eager":
        del call
    _release(device)
    return result


def time_rollout(model, schedule=None, *, steps: int = 50, sampler: str = "ddim", batch: int = 1,
                 cfg: bool = False, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, mode: str = "eager", repeats: int = 5, warmup: int = 1,
                 scheduler_config: dict | None = None, seed: int = 0, graph=None, strict: bool = True,
                 pattern_repeats: int = 10, return_sample: bool = False, run_graph=None,
                 compile_units: bool = False) -> dict:
    """End-to-end latency of one sampler rollout of `steps` steps at `batch` samples (the scheduler's steps,
    CFG arithmetic and every denoiser call included), dense or under `schedule` (a diffprune Schedule for this
    sampler and step count, possibly with its own timestep grid; strict=False accepts it for another architecture
    with the same units). graph: the model's UnitGraph at the schedule's granularity (built when omitted);
    run_graph: the same with attention products counted (FLOPs that run; built when omitted).

    Returns median/p10/p90/... ms of the rollout, per_call_ms (median / denoiser calls), the MACs of the rollout
    and the ideal speedups they imply (ideal_speedup: FLOPs that run, attention included; macs_ideal_speedup:
    torch-pruning's convention, the papers'), and peak memory. In graph/static mode also: the number of step
    patterns (= CUDA graphs captured), the calls using each, each pattern's call time (pattern_call_ms), their sum
    over the rollout (denoiser_ms: the rollout minus it is the sampler's own time) and capture_s; in capture mode
    (the whole rollout as one CUDA graph, capture.py) capture_s. With return_sample=True the final latents of the
    last timed rollout come back under "sample" (every rollout starts from the same noise, so this checks that
    modes and schedules agree). compile_units (capture mode): each unit compiled with torch.compile inside the
    captured rollout (capture.capture_rollout).
    """

    model = denoiser_of(model)
    device = next(model.parameters()).device
    check_mode(mode, device)
    if compile_units and mode != "capture":
        raise DiffpruneError("compile_units applies to mode 'capture' (the whole rollout captured)")
    positive_int(steps, "steps")
    positive_int(repeats, "repeats")
    x_call, cond = denoiser_inputs(model, batch, cfg, height, width)
    c, u = _conditions(model, batch, cfg)
    guidance = guidance_scale if cfg else 1.0
    distilled = get_adapter(model).distilled_guidance(model)
    if distilled:  # FLUX.1-dev: the scale is a model input the plan sets; the loop does no CFG mixing
        c, guidance = {k: v for k, v in c.items() if k != "guidance"}, guidance_scale
    # the rollout exactly as sampling.sample() plans it (grid, conditioning, sampler settings), timesteps on the CPU
    plan = plan_rollout(model, steps, sampler, cond=c, uncond=u, batch=batch, guidance_scale=guidance,
                        height=x_call.shape[-2], width=x_call.shape[-1],  # FLUX's shift reads the size
                        scheduler=make_scheduler(sampler, scheduler_config),
                        grid=schedule.grid if schedule is not None else None, timestep_device=None)
    template, reuse, n_calls = plan.scheduler, plan.reuse, plan.n_calls
    if distilled:
        cond = plan.model_cond  # the eager and per-pattern paths call the model with the plan's guidance input
    base_calls = len(set_grid(make_scheduler(sampler, scheduler_config), steps).timesteps)
    t_dtype = template.timesteps.dtype
    granularity = schedule.granularity if schedule is not None else "coarse"
    size = dict(batch=1, height=x_call.shape[-2], width=x_call.shape[-1])
    if graph is None or graph.granularity != granularity:
        graph = build_graph(model, granularity, **size)
    if run_graph is None or run_graph.granularity != granularity:
        run_graph = build_graph(model, granularity, include_attention=True, **size)
    if schedule is not None:
        schedule.check(graph, n_calls=n_calls, sampler=sampler, num_steps=steps)
    macs = macs_summary(graph, schedule, base_calls, run_graph=run_graph)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((batch, *x_call.shape[1:]), generator=gen).to(device, x_call.dtype)
    adapter = get_adapter(model)

    extra: dict = {}
    reset_peak_memory(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        runtime = None
        if schedule is not None and mode != "capture":
            runtime = stack.enter_context(apply_schedule(model, schedule, graph=graph, strict=strict,
                                                         static=mode != "eager"))
        if mode == "capture":
            t0 = time.perf_counter()
            captured = CapturedRollout(model, schedule, steps=steps, sampler=sampler, batch=batch,
                                       guidance_scale=guidance, cond=c, uncond=u,
                                       height=x_call.shape[-2], width=x_call.shape[-1],
                                       scheduler=make_scheduler(sampler, scheduler_config), strict=strict,
                                       mode="graph" if device.type == "cuda" else "eager", graph=graph,
                                       compile_units=compile_units)
            captured.noise.copy_(noise)
            extra["capture_s"] = time.perf_counter() - t0
            last = []

            def rollout():
                last[:] = [captured.replay()]
        else:
            if mode == "eager":
                def denoise(c, xin, t):
                    tt = torch.full((xin.shape[0],), t.item(), dtype=t_dtype, device=device)
                    return adapter.predict_noise(model, xin, tt, cond)
            else:
                patterns = runtime.step_patterns() if runtime is not None else []
                index = np.zeros(n_calls, dtype=int)
                for k, p in enumerate(patterns):
                    index[p.steps] = k
                t0 = time.perf_counter()
                call = _StaticCall(model, x_call, template.timesteps[0].item(), cond, mode, runtime,
                                   [p.steps[0] for p in patterns], t_dtype=t_dtype)
                extra["capture_s"] = time.perf_counter() - t0
                extra["patterns"] = len(call.steps)
                extra["pattern_steps"] = [len(p.steps) for p in patterns] or [n_calls]
                extra["pattern_call_ms"] = [summarize(measure(lambda k=k: call.run(k), device, pattern_repeats, 1))
                                            ["median_ms"] for k in range(len(call.steps))]
                # what the denoiser calls alone should take; the rest of a rollout is the sampler's own work
                extra["denoiser_ms"] = float(np.dot(extra["pattern_steps"], extra["pattern_call_ms"]))

                def denoise(c, xin, t):
                    call.x.copy_(xin)
                    call.t.fill_(t.item())
                    out = call.run(int(index[c]))
                    return out.clone() if not cfg else out  # samplers keep past outputs (PLMS, DPM-Solver)

            last = []

            def rollout():
                if mode == "eager":
                    notify_rollout_start(model, n_calls)  # the runtime resets its caches
                # graph/static: step 0 refills every cache; a runtime reset would free the buffers graphs write
                sched = copy.deepcopy(template)  # a fresh sampler state, as a pipeline call has
                calls = iter(range(n_calls))

                def predict(i, xin, t):
                    return denoise(next(calls), xin, t)

                x = run_loop(sched, noise * sched.init_noise_sigma, predict, reuse=reuse,
                             guidance_scale=plan.guidance_scale,
                             step_kwargs=plan.step_kwargs)
                last[:] = [finish(model, x)]

        samples = measure(rollout, device, repeats, warmup)
        final = last[0].clone() if return_sample else None
        if mode in ("graph", "static"):
            del call  # the graphs go before the runtime frees the caches they write
        if mode == "capture":
            del captured
    result = {**_context(model, mode), "what": "rollout", "schedule": schedule is not None, "sampler": sampler,
              "steps": steps, "calls": n_calls, "visits": len(reuse), "batch": batch, "cfg": bool(cfg),
              "guidance_scale": guidance_scale, "denoiser_batch": int(x_call.shape[0]),
              "input_shape": list(x_call.shape), "granularity": granularity, **summarize(samples),
              "per_call_ms": float(np.median(samples)) / n_calls, **macs, **extra, **peak_memory(device)}
    if final is not None:
        result["sample"] = final.detach().float().cpu()
    _release(device)
    return result


# ----- reporting -----------------------------------------------------------------------------------
def add_speedups(results: list[dict]) -> list[dict]:
    """Set `speedup` (dense rollout time / this rollout's, same mode and sampler settings) on each rollout."""
    def key(r):
        return (r["mode"], r["sampler"], r["steps"], r["batch"], r["cfg"])
    dense = {key(r): r["median_ms"] for r in results if r.get("what") == "rollout" and not r.get("schedule")}
    for r in results:
        if r.get("what") == "rollout" and key(r) in dense:
            r["speedup"] = dense[key(r)] / r["median_ms"]
    return results


def timing_warnings(results: list[dict], load: float | None = None, cores: int | None = None,
                    max_spread: float = 0.2) -> list[str]:
    """Why timings may be noise: repeats that disagree (p10..p90 wider than max_spread of the median) and a machine
    busy with other work (1-minute load average above its cores: other processes took turns on them)."""
    out = []
    for r in results:
        spread = (r["p90_ms"] - r["p10_ms"]) / r["median_ms"]
        if r["n"] >= 3 and spread > max_spread:
            name = r.get("label") or f"{r['mode']} {r['what']} {'schedule' if r.get('schedule') else 'dense'}"
            ms = [f"{r[k]:.0f}" if r[k] >= 10 else f"{r[k]:.2f}" for k in ("p10_ms", "p90_ms", "median_ms")]
            out.append(f"{name}: repeats disagree, p10..p90 {ms[0]}..{ms[1]} ms is {spread:.0%} of the median "
                       f"{ms[2]} ms")
    if load is not None and cores and load > cores + 0.5:
        out.append(f"the machine is busy: load average {load:.1f} on {cores} cores, so other processes took turns "
                   f"on the cores being timed")
    return out


def format_table(results: list[dict]) -> str:
    """A plain-text table of call and rollout results (one row each)."""
    head = f"{'mode':7s} {'run':18s} {'median ms':>10s} {'p10':>9s} {'p90':>9s} {'ms/call':>8s} " \
           f"{'speedup':>8s} {'ideal':>7s} {'tp ideal':>8s} {'peak MiB':>9s}"
    lines = [head, "-" * len(head)]
    for r in results:
        name = r.get("label") or (f"{r['what']} {'schedule' if r.get('schedule') else 'dense'}")
        per_call = r["median_ms"] if r["what"] == "call" else r["per_call_ms"]
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        ideal = f"{r['ideal_speedup']:.2f}x" if "ideal_speedup" in r else ""
        tp = f"{r['macs_ideal_speedup']:.2f}x" if "macs_ideal_speedup" in r else ""
        lines.append(f"{r['mode']:7s} {name:18s} {r['median_ms']:10.2f} {r['p10_ms']:9.2f} {r['p90_ms']:9.2f} "
                     f"{per_call:8.2f} {speed:>8s} {ideal:>7s} {tp:>8s} {r['peak_mem_bytes'] / 2**20:9.0f}")
    lines.append("ideal: FLOPs that run (attention products counted); tp ideal: torch-pruning's MACs convention "
                 "(the papers', attention left out)")
    return "\n".join(lines)
