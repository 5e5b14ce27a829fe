"""diffprune bench: latency and peak memory of a denoiser, per call and end to end, dense and under a schedule."""
from __future__ import annotations

import json
import os
import sys


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="time a denoiser (per call and whole rollouts), dense and under a schedule",
        description="Time MODEL: one denoiser call, and whole sampler rollouts (scheduler steps included), dense "
                    "and, with --schedule, under the schedule; report median/p10/p90 ms, the measured speedup next "
                    "to the ideal (FLOPs that run, attention included; torch-pruning's MACs convention beside it), "
                    "and peak memory. On a GPU the default modes are 'capture' (the whole rollout, sampler and "
                    "guidance arithmetic included, as one CUDA graph) and 'graph' (the denoiser captured once per "
                    "distinct step pattern, the sampler eager): eager PyTorch is launch-bound on fast GPUs, so "
                    "compare dense and pruned captured; on a CPU, eager wall time.")
    p.add_argument("model", help="zoo name (e.g. sd15, dit-xl-2, fmnist-unet) or local diffusers model/pipeline "
                                 "directory")
    p.add_argument("--schedule", help="a schedule JSON (diffprune search): also time rollouts under it")
    p.add_argument("--steps", type=int, help="sampler steps (default: the schedule's, else 50)")
    p.add_argument("--sampler", help="ddim, ddpm, plms, dpm-solver++ or lcm (default: the schedule's, else ddim)")
    p.add_argument("--batch", type=int, default=1, help="samples per rollout (default 1)")
    p.add_argument("--cfg", action="store_true",
                   help="classifier-free guidance: the denoiser runs on the doubled batch [uncond; cond]")
    p.add_argument("--guidance", type=float,
                   help="guidance scale used with --cfg (default: the model's, as `diffprune sample` uses it)")
    p.add_argument("--height", type=int, help="input height in model pixels (latents for latent models)")
    p.add_argument("--width", type=int)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="model precision (default fp16 on cuda, fp32 on cpu)")
    from ._common import add_device_arg
    add_device_arg(p)
    p.add_argument("--mode", help="comma-separated: capture (whole rollout as one CUDA graph), graph (one CUDA graph "
                                  "per step pattern), eager, static (the graph path without capture) (default "
                                  "capture,graph on cuda, eager on cpu)")
    p.add_argument("--repeats", type=int, help="timed rollouts per setting (default 5 on cuda, 10 on cpu)")
    p.add_argument("--call-repeats", type=int, default=30, help="timed single calls (default 30)")
    p.add_argument("--warmup", type=int,
                   help="untimed rollouts before timing (default 1 on cuda; 3 on cpu, where the first rollouts run "
                        "slow while allocator and thread pool settle)")
    p.add_argument("--no-call", action="store_true", help="skip the single-call timing")
    p.add_argument("--no-dense", action="store_true", help="with --schedule: skip the dense rollouts")
    p.add_argument("--no-strict", action="store_true",
                   help="accept a schedule made for another architecture with the same units (e.g. the dense "
                        "model that a structurally pruned one came from)")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    return p


def run(args):
    from tqdm.auto import tqdm

    from ..errors import DiffpruneError
    from .. import latency
    from ..models import build_graph
    from ..util import atomic_write_text, denoiser_of, positive_int
    from ._common import claim, default_guidance, load_for_sampling, load_schedule, resolve_device

    device = resolve_device(args.device)
    on_cpu = device == "cpu"
    args.repeats = args.repeats if args.repeats is not None else (10 if on_cpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cpu else 1)
    for name in ("batch", "repeats", "call_repeats"):
        positive_int(getattr(args, name), "--" + name.replace("_", "-"))
    if args.steps is not None:
        positive_int(args.steps, "--steps")
    if args.warmup < 0:
        raise DiffpruneError(f"--warmup must be >= 0, got {args.warmup}")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    modes = [m.strip() for m in (args.mode or ("capture,graph" if device.startswith("cuda") else "eager")).split(",")]
    for m in modes:
        if m not in latency.MODES:
            raise DiffpruneError(f"unknown --mode {m!r}; choose from {', '.join(latency.MODES)}")
    if {"graph", "capture"} & set(modes) and not device.startswith("cuda"):
        raise DiffpruneError("--mode graph and capture record CUDA graphs, which needs --device cuda; use --mode "
                             "eager on a CPU")
    if args.no_dense and not args.schedule:
        raise DiffpruneError("--no-dense needs --schedule (otherwise there is nothing to time)")

    schedule = load_schedule(args.schedule)
    if args.json:  # an unwritable place fails now, not after the timings
        claim(args, args.json, "--json")
    steps = args.steps or (schedule.num_steps if schedule is not None else 50)
    sampler = args.sampler or (schedule.sampler if schedule is not None else "ddim")
    obj = load_for_sampling(args.model, device, dtype)
    model = denoiser_of(obj)
    scheduler_config = dict(obj.scheduler.config) if obj is not model else None
    if args.guidance is None:
        args.guidance = default_guidance(obj)
    common = dict(batch=args.batch, cfg=args.cfg, height=args.height, width=args.width)
    rollout = dict(common, steps=steps, sampler=sampler, guidance_scale=args.guidance, repeats=args.repeats,
                   warmup=args.warmup, scheduler_config=scheduler_config)

    # the unit graph (MACs, data flow, step patterns) is traced once and shared by every measurement
    granularity = schedule.granularity if schedule is not None else "coarse"
    graph = build_graph(model, granularity, height=args.height, width=args.width)
    run_graph = build_graph(model, granularity, height=args.height, width=args.width, include_attention=True)
    jobs = []  # (label, thunk), run under one progress bar
    for mode in modes:
        if not args.no_call and mode != "capture":
            jobs.append((f"{mode} call", lambda mode=mode: latency.time_denoiser_call(
                model, **common, mode=mode, repeats=args.call_repeats)))
        runs = ([None] if not args.no_dense else []) + ([schedule] if schedule is not None else [])
        for sched in runs:
            jobs.append((f"{mode} rollout {'schedule' if sched is not None else 'dense'}",
                         lambda mode=mode, sched=sched: latency.time_rollout(
                             model, sched, **rollout, mode=mode, graph=graph, run_graph=run_graph,
                             strict=not args.no_strict)))
    results, loads = [], [_load()]  # load sampled through the run, not only at its ends
    with tqdm(jobs, desc="bench", unit="run", leave=False) as bar:
        for label, job in bar:
            bar.set_postfix_str(label)
            results.append(job())
            loads.append(_load())
    latency.add_speedups(results)
    load = max(loads) if on_cpu and None not in loads else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    noise = latency.timing_warnings(results, load=load, cores=cores)
    print(f"{args.model}: {type(model).__name__}, {dtype} on {device}, batch {args.batch}"
          f"{' (CFG: denoiser batch ' + str(2 * args.batch) + ')' if args.cfg else ''}, {sampler} {steps} steps"
          f"{', schedule ' + args.schedule if schedule is not None else ''}")
    print(latency.format_table(results))
    for w in noise:
        print(f"diffprune bench: warning: {w}", file=sys.stderr)
    if noise:
        print("diffprune bench: these timings are noisy; time again on an idle machine, with more --repeats and "
              "--warmup", file=sys.stderr)
    if args.json:
        doc = {"model": args.model, "device": device, "dtype": dtype, "schedule": args.schedule,
               "steps": steps, "sampler": sampler, "results": results, "warnings": noise,
               "load_average": loads if on_cpu else None}
        atomic_write_text(args.json, json.dumps(doc, indent=1))
        print(f"wrote {args.json}")
    return 0


def _load():
    """The 1-minute load average (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
