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

A replayed graph runs no Python, so the unit caches of a schedule cannot be Python references that change from
step to step: graphs captured for different patterns must read and write the same memory. `StaticUnitCache`
therefore keeps every reused unit output in a buffer allocated before capture and updated in place.

Timing: CUDA events around the region (synchronised after each repeat), after warm-up; on a CPU, wall time
under torch.inference_mode. Results are medians with p10/p90 over the repeats. Peak memory: on CUDA
torch.cuda.max_memory_allocated since the start of the measurement; on a CPU the process's peak resident set
size (ru_maxrss, a high-water mark of the whole process that cannot be reset).
"""
from __future__ import annotations

import contextlib
import gc
import resource
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from ..errors import DiffpruneError
from ..models import build_graph, get_adapter
from ..util import denoiser_of, positive_int

MODES = ("eager", "graph", "static")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----- arguments ---------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cuda' when a GPU is there and nothing was asked; a clear error when CUDA is asked without one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DiffpruneError(f"unknown device {device!r}; use cpu or cuda") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffpruneError("CUDA was requested but no CUDA GPU is available to this PyTorch "
                             f"(torch {torch.__version__}); run on a GPU machine or pass --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DiffpruneError(f"device {device!r} is not supported for benchmarks; use cpu or cuda")
    return dev


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise DiffpruneError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise DiffpruneError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "graph" and device.type != "cuda":
        raise DiffpruneError("mode 'graph' captures CUDA graphs and needs a CUDA device; use eager (or static) "
                             "on a CPU")
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
def denoiser_inputs(model, batch: int, cfg: bool, height=None, width=None, seed: int = 0):
    """(x, cond) for one denoiser call at `batch` samples: x has the denoiser batch (2*batch with CFG, the
    doubled [uncond; cond] batch one pipeline call runs) and cond the matching conditioning."""
    positive_int(batch, "batch")
    adapter = get_adapter(model)
    p = next(model.parameters())
    x, _, cond = adapter.example_inputs(model, batch=batch, height=height, width=width, device=p.device,
                                        dtype=p.dtype)
    if not cfg:
        return x, cond
    if adapter.conditioning == "text":
        _, _, uncond = adapter.example_inputs(model, batch=batch, height=height, width=width, device=p.device,
                                              dtype=p.dtype)
    else:
        uncond = adapter.null_condition(model, batch, device=p.device)
    if not cond or not uncond:
        raise DiffpruneError(f"{adapter.family} model without conditioning: classifier-free guidance (--cfg) "
                             "does not apply to it")
    return torch.cat([x, x]), _cat_cond(uncond, cond)


def _cat_cond(a, b):
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    return a  # None and other non-tensors pass through


# ----- static unit caches for captured schedules --------------------------------------------------
def _tree_clone(obj):
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tree_clone(v) for v in obj)
    if isinstance(obj, dict):
        return type(obj)(**{k: _tree_clone(v) for k, v in obj.items()})
    return obj


def _tree_copy_(dst, src):
    if torch.is_tensor(dst):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _tree_copy_(d, s)
    elif isinstance(dst, dict):
        for k in dst:
            _tree_copy_(dst[k], src[k])


class StaticUnitCache:
    """Run a denoiser with a chosen set of live units; every other unit in `units` returns its last output
    from a static buffer. A live unit computes and writes its output into its buffer in place, so graphs
    captured for different live sets all read and write the same memory. Units live at every step of a
    schedule need no buffer and are not wrapped (a keep-everything schedule captures the plain dense graph).
    Use as a context manager; the original forwards are restored on exit, also on errors."""

    def __init__(self, model: torch.nn.Module, units: list[str]):
        self.model = model
        self.units = list(units)
        self.live: set[str] = set(self.units)
        self.buffers: dict[str, Any] = {}
        self._patched: list[torch.nn.Module] = []

    def set_live(self, live: set[str]):
        self.live = set(live)

    def _wrap(self, name: str, module: torch.nn.Module):
        original = module.forward

        def forward(*args, **kwargs):
            if name in self.live:
                out = original(*args, **kwargs)
                if name in self.buffers:
                    _tree_copy_(self.buffers[name], out)
                else:  # first (eager, uncaptured) run allocates the buffer
                    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                        raise RuntimeError(f"unit {name}: cache buffer allocated during graph capture")
                    self.buffers[name] = _tree_clone(out)
                return out
            if name not in self.buffers:
                raise DiffpruneError(f"unit {name} is reused before it ever ran; a schedule's step 0 must "
                                     "compute every unit")
            return self.buffers[name]
        return forward

    def __enter__(self):
        try:
            for name in self.units:
                module = self.model.get_submodule(name)
                module.forward = self._wrap(name, module)
                self._patched.append(module)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for module in self._patched:
            with contextlib.suppress(AttributeError):
                del module.forward  # the instance attribute shadowed the class's forward
        self._patched = []
        return False


def step_patterns(graph, schedule) -> tuple[np.ndarray, np.ndarray]:
    """The distinct live-unit patterns of a schedule and which pattern each step uses.

    Returns (patterns, index): patterns is (P, n_units) bool in graph.units order, ordered by first use;
    index[s] is the pattern of step s. Liveness applies the dependency cascade (UnitGraph.live_units)."""
    table = schedule_table(graph, schedule)
    live = np.stack([graph.live_units(row) for row in table])
    _, first, inverse = np.unique(live, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)            # renumber patterns by first use: step 0's pattern is number 0
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return live[np.sort(first)], rank[np.asarray(inverse).reshape(-1)]


def schedule_table(graph, schedule) -> np.ndarray:
    """The schedule's (steps x units) keep table with its columns in graph.units order."""
    table = np.asarray(schedule.table, dtype=bool)
    units = list(schedule.units)
    if sorted(units) != sorted(graph.units):
        raise DiffpruneError(f"the schedule's units ({len(units)}, e.g. {units[:2]}) are not this model's "
                             f"{graph.granularity} units ({graph.n_units}, e.g. {graph.units[:2]}); the schedule "
                             "was made for another model or granularity")
    if table.ndim != 2 or table.shape[1] != len(units):
        raise DiffpruneError(f"schedule table has shape {table.shape}, expected (steps, {len(units)})")
    if not table[0].all():
        raise DiffpruneError("step 0 of the schedule does not compute every unit; it must (it fills the caches)")
    return table[:, [units.index(u) for u in graph.units]]


def macs_summary(graph, schedule, steps: int) -> dict:
    """Dense and scheduled MACs of a rollout (cascade applied) and the ideal speedup they imply."""
    dense = graph.total_macs * steps
    if schedule is None:
        return {"dense_macs": dense, "schedule_macs": dense, "macs_reduction": 0.0, "macs_ideal_speedup": 1.0}
    sched = graph.schedule_macs(schedule_table(graph, schedule))
    return {"dense_macs": dense, "schedule_macs": sched, "macs_reduction": 1 - sched / dense,
            "macs_ideal_speedup": dense / sched}


# ----- one denoiser call on static buffers, replayable ---------------------------------------------
class _StaticCall:
    """A denoiser call on static input and output buffers, for one or several step patterns.

    In "graph" mode each pattern is warmed up on a side stream and captured into a CUDA graph (all graphs share
    one memory pool: they never run concurrently and keep no state in it); in "static" mode run() calls the
    denoiser eagerly on the same buffers."""

    def __init__(self, model, x, t_value, cond, mode: str, patterns: list[set[str]] | None = None,
                 cache: StaticUnitCache | None = None, t_dtype=torch.long):
        self.model, self.mode, self.cache = model, mode, cache
        self.adapter = get_adapter(model)
        self.x = x.clone()
        self.t = torch.full((x.shape[0],), t_value, dtype=t_dtype, device=x.device)
        self.cond = cond
        self.patterns = patterns or [None]
        self.graphs: list = []
        with torch.inference_mode():
            self.out = self._forward(self.patterns[0]).clone()  # fills every cache buffer (pattern 0 is all-live)
        if mode == "graph":
            self._capture()

    def _forward(self, pattern):
        if self.cache is not None and pattern is not None:
            self.cache.set_live(pattern)
        return self.adapter.predict_noise(self.model, self.x, self.t, self.cond)

    def _body(self, pattern):
        self.out.copy_(self._forward(pattern))

    def _capture(self):
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        with torch.inference_mode():
            for pattern in self.patterns:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
                    for _ in range(2):
                        self._body(pattern)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._body(pattern)
                self.graphs.append(g)
        torch.cuda.synchronize()

    def run(self, pattern_index: int = 0):
        if self.mode == "graph":
            self.graphs[pattern_index].replay()
        else:
            self._body(self.patterns[pattern_index])
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
                 scheduler_config: dict | None = None, seed: int = 0, graph=None, pattern_repeats: int = 10,
                 return_sample: bool = False) -> dict:
    """End-to-end latency of one sampler rollout: `steps` sampler steps (scheduler steps, CFG arithmetic and
    every denoiser call included), dense or under a static `schedule` (a diffprune Schedule, or anything with
    `.table` (calls x units, bool) and `.units`). In graph/static mode it also reports each step pattern's
    call time (`pattern_call_ms`) and how many graphs were captured. With return_sample=True the final latents
    come back under "sample" (for checking that modes agree)."""
    from ..sampling import make_scheduler, notify_rollout_start

    model = denoiser_of(model)
    device = next(model.parameters()).device
    check_mode(mode, device)
    positive_int(steps, "steps")
    positive_int(repeats, "repeats")
    scheduler = make_scheduler(sampler, scheduler_config)
    scheduler.set_timesteps(steps)
    n_calls = len(scheduler.timesteps)
    x_call, cond = denoiser_inputs(model, batch, cfg, height, width)
    granularity = getattr(schedule, "granularity", "coarse") if schedule is not None else "coarse"
    if graph is None or graph.granularity != granularity:
        graph = build_graph(model, granularity, batch=1, height=x_call.shape[-2], width=x_call.shape[-1])
    if schedule is not None and len(schedule.table) != n_calls:
        raise DiffpruneError(f"the schedule has {len(schedule.table)} steps but {sampler} with {steps} steps makes "
                             f"{n_calls} denoiser calls; use a schedule made for this sampler and step count")
    macs = macs_summary(graph, schedule, n_calls)
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn((batch, *x_call.shape[1:]), generator=g).to(device, x_call.dtype)
    adapter = get_adapter(model)

    extra: dict = {}
    reset_peak_memory(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if mode == "eager":
            if schedule is not None:
                from ..schedule import apply_schedule
                stack.enter_context(apply_schedule(model, schedule))

            def denoise(i, xin, t):
                tt = torch.full((xin.shape[0],), t.item(), dtype=scheduler.timesteps.dtype, device=device)
                return adapter.predict_noise(model, xin, tt, cond)
        else:
            if schedule is None:
                patterns, index, cache = [None], np.zeros(n_calls, dtype=int), None
            else:
                live, index = step_patterns(graph, schedule)
                reused = [u for u, always in zip(graph.units, live.all(axis=0)) if not always]
                cache = stack.enter_context(StaticUnitCache(model, reused))
                patterns = [{u for u, l in zip(graph.units, row) if l} for row in live]
                extra["cached_units"] = len(reused)
            t0 = time.perf_counter()
            call = _StaticCall(model, x_call, int(scheduler.timesteps[0]), cond, mode, patterns, cache,
                               t_dtype=scheduler.timesteps.dtype)
            extra["capture_s"] = time.perf_counter() - t0
            extra["patterns"] = len(patterns)
            extra["pattern_steps"] = [int((index == p).sum()) for p in range(len(patterns))]
            extra["pattern_call_ms"] = [summarize(measure(lambda p=p: call.run(p), device, pattern_repeats, 1))
                                        ["median_ms"] for p in range(len(patterns))]

            def denoise(i, xin, t):
                call.x.copy_(xin)
                call.t.fill_(t.item())
                out = call.run(int(index[i]))
                return out.clone() if not cfg else out  # samplers keep past outputs (PLMS, DPM-Solver)

        def rollout():
            notify_rollout_start(model, n_calls)
            scheduler.set_timesteps(steps)  # resets the sampler's state, as a pipeline call does
            x = noise * scheduler.init_noise_sigma
            for i, t in enumerate(scheduler.timesteps):
                xin = torch.cat([x, x]) if cfg else x
                xin = scheduler.scale_model_input(xin, t)
                eps = denoise(i, xin, t)
                if cfg:
                    uncond, text = eps.chunk(2)
                    eps = uncond + guidance_scale * (text - uncond)
                x = scheduler.step(eps, t, x, return_dict=False)[0]
            return x

        samples = measure(rollout, device, repeats, warmup)
        final = rollout() if return_sample else None
    result = {**_context(model, mode), "what": "rollout", "schedule": schedule is not None, "sampler": sampler,
              "steps": steps, "calls": n_calls, "batch": batch, "cfg": bool(cfg), "guidance_scale": guidance_scale,
              "denoiser_batch": int(x_call.shape[0]), "input_shape": list(x_call.shape), "granularity": granularity,
              **summarize(samples), "per_call_ms": float(np.median(samples)) / n_calls, **macs, **extra,
              **peak_memory(device)}
    if final is not None:
        result["sample"] = final.detach().float().cpu()
    if mode != "eager":
        del call
    _release(device)
    return result
