"""A bench run as `diffprune bench` asks for it: one denoiser call and whole rollouts, dense and under a schedule,
in each timing mode, all sharing one traced unit graph; the load average sampled through the run, and the warnings
that noisy timings earn. The timings themselves are latency.py's."""
from __future__ import annotations

import contextlib
import os

from tqdm.auto import tqdm

from . import latency
from .errors import DiffpruneError
from .models import build_graph
from .util import denoiser_of


def default_modes(device: str) -> str:
    return "capture,graph" if device.startswith("cuda") else "eager"


def check_modes(modes: list[str], device: str) -> list[str]:
    for m in modes:
        if m not in latency.MODES:
            raise DiffpruneError(f"unknown --mode {m!r}; choose from {', '.join(latency.MODES)}")
    if {"graph", "capture"} & set(modes) and not device.startswith("cuda"):
        raise DiffpruneError("--mode graph and capture record CUDA graphs, which needs --device cuda; use --mode "
                             "eager on a CPU")
    return modes


def bench(obj, schedule=None, *, device: str, modes: list[str], steps: int, sampler: str, batch: int = 1,
          cfg: bool = False, guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
          repeats: int = 5, call_repeats: int = 30, warmup: int = 1, call: bool = True, dense: bool = True,
          strict: bool = True, progress: bool = True) -> dict:
    """Time `obj` (a denoiser or pipeline, loaded on `device`): per mode a single call (unless `call` is False or
    the mode is capture) and whole rollouts, dense (unless `dense` is False) and under `schedule`. Returns
    {"results": latency's result per timing, with speedups, "warnings": what makes them noisy, "load_average":
    the CPU load sampled before and after each timing (None on a GPU)}."""
    model = denoiser_of(obj)
    on_cpu = device == "cpu"
    scheduler_config = dict(obj.scheduler.config) if obj is not model else None
    common = dict(batch=batch, cfg=cfg, height=height, width=width)
    rollout = dict(common, steps=steps, sampler=sampler, guidance_scale=guidance_scale, repeats=repeats,
                   warmup=warmup, scheduler_config=scheduler_config)
    # the unit graph (MACs, data flow, step patterns) is traced once and shared by every measurement
    granularity = schedule.granularity if schedule is not None else "coarse"
    graph = build_graph(model, granularity, height=height, width=width)
    run_graph = build_graph(model, granularity, height=height, width=width, include_attention=True)
    jobs = []  # (label, thunk), run under one progress bar
    for mode in modes:
        if call and mode != "capture":
            jobs.append((f"{mode} call", lambda mode=mode: latency.time_denoiser_call(
                model, **common, mode=mode, repeats=call_repeats)))
        runs = ([None] if dense else []) + ([schedule] if schedule is not None else [])
        for sched in runs:
            jobs.append((f"{mode} rollout {'schedule' if sched is not None else 'dense'}",
                         lambda mode=mode, sched=sched: latency.time_rollout(
                             model, sched, **rollout, mode=mode, graph=graph, run_graph=run_graph, strict=strict)))
    results, loads = [], [load_average()]  # load sampled through the run, not only at its ends
    with tqdm(jobs, desc="bench", unit="run", leave=False, disable=not progress) as bar:
        for label, job in bar:
            bar.set_postfix_str(label)
            results.append(job())
            loads.append(load_average())
    latency.add_speedups(results)
    load = max(loads) if on_cpu and None not in loads else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"results": results, "warnings": latency.timing_warnings(results, load=load, cores=cores),
            "load_average": loads if on_cpu else None}


def load_average(digits: int | None = None):
    """The 1-minute load average, rounded to `digits` if given (None where the platform has none)."""
    with contextlib.suppress(OSError, AttributeError):
        load = os.getloadavg()[0]
        return load if digits is None else round(load, digits)
    return None
